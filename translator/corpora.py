"""English-French corpora: named sets (Multi30k, Tatoeba, WMT news, Canada's laws, the Python docs), TFDS and text files, as lists of sentence pairs."""

import difflib
import gzip
import hashlib
import logging
import os
import random
import unicodedata
import zlib

import keras

logger = logging.getLogger("translator.corpora")

# Environment variable naming a local folder with `multi30k/` and `tatoeba/` in it.
DATA_DIR_ENV = "TRANSLATOR_DATA_DIR"
# Where a user's machine downloads Multi30k task 1 (raw text) from: `{url}/{split}.{lang}.gz`.
MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw"
# The Tatoeba (manythings.org Anki) export used by the TensorFlow tutorials; `fra.txt` inside.
TATOEBA_URL = "http://storage.googleapis.com/download.tensorflow.org/data/fra-eng.zip"
# Split name -> file stem; "validation" and "test" are aliases so that every corpus accepts
# the same three names.
MULTI30K_SPLITS = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "test_2016_flickr": "test_2016_flickr",
    "test": "test_2016_flickr",
}
TATOEBA_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
# Tatoeba has no official split: each English sentence goes to "test" or "validation" with
# this probability (percent) each, by a hash of the sentence (see `tatoeba_split`).
TATOEBA_HELD_OUT_PERCENT = 2
# WMT news test sets (English-French), as sacreBLEU names them. The 2008-2012 sets (and
# newssyscomb2009) are the `news` corpus's train split; newstest2013 is its dev set.
NEWS_TRAIN_SETS = (
    "newstest2008",
    "newssyscomb2009",
    "newstest2009",
    "newstest2010",
    "newstest2011",
    "newstest2012",
)
NEWS_DEV_SET = "newstest2013"
NEWS_SPLITS = {
    "train": NEWS_TRAIN_SETS,
    "val": (NEWS_DEV_SET,),
    "validation": (NEWS_DEV_SET,),
    **{name: (name,) for name in (*NEWS_TRAIN_SETS, NEWS_DEV_SET)},
}
# sacreBLEU's test-set names for the files above (what a user with network downloads).
SACREBLEU_NEWS_SETS = {
    "newstest2008": "wmt08",
    "newssyscomb2009": "wmt09/newssyscomb",  # not in sacreBLEU's index: only the local copy
    "newstest2009": "wmt09",
    "newstest2010": "wmt10",
    "newstest2011": "wmt11",
    "newstest2012": "wmt12",
    "newstest2013": "wmt13",
}
# Corpora that hold out whole documents (never lines) for validation and test: the
# `train.ids.gz` beside their text gives each line's document, and an MD5 of the document
# name (see `document_split`) puts this many per mille of documents in "test" and as many
# in "validation".
DOCUMENT_SPLIT_PER_MILLE = {"justice-canada": 5, "python-docs-fr": 50}
DOCUMENT_SPLITS = {
    "train": "train",
    "val": "validation",
    "validation": "validation",
    "test": "test",
}
CORPUS_CHOICES = (
    "multi30k",
    "tatoeba",
    "news (WMT newstest 2008-2013)",
    "justice-canada (Canada's Acts and Regulations)",
    "python-docs-fr (the Python documentation)",
    "tfds:<name> (e.g. tfds:wmt14_translate/fr-en)",
    "folder:<dir> (TFDS TranslateFolder: en.<split>.txt, fr.<split>.txt)",
    "files:<english_path>,<french_path> (may contain {split})",
)


class DataError(ValueError):
    """A corpus is missing, malformed or empty; the message says which file and what to do."""


# --------------------------------------------------------------------------------------------
# Corpora.


def load_pairs(corpus, split, data_dir=None, cache_dir=None):
    """Loads aligned (english, french) sentence pairs of one split of a corpus.

    Sentences are stripped of surrounding whitespace. Pairs with an empty or
    whitespace-only side are dropped, with one log line (logger `"translator.corpora"`)
    saying how many; a split that ends up empty raises `DataError`.

    Corpora:
        - `"multi30k"`: Multi30k task 1 (Elliott et al., 2016), splits `"train"` (29,000),
          `"val"` / `"validation"` (1,014), `"test_2016_flickr"` / `"test"` (1,000). Read
          from `<data_dir>/multi30k/{split}.{en,fr}.gz`, else downloaded from
          `MULTI30K_URL` into the Keras cache.
        - `"tatoeba"`: the Tatoeba English-French pairs (`English<TAB>French[<TAB>...]`),
          from `<data_dir>/tatoeba/fra-eng.tsv`, else from the `fra.txt` of `TATOEBA_URL`.
          Splits `"train"`, `"validation"` (alias `"val"`), `"test"`, made by
          `tatoeba_split`: about 96% / 2% / 2%, all translations of an English sentence on
          one side.
        - `"news"`: the WMT news test sets, from `<data_dir>/news/<set>.{en,fr}.gz`, else
          from sacreBLEU's downloader. Split `"train"` is newstest2008-2012 with
          newssyscomb2009 (13,573 pairs), `"newstest2013"` (alias `"val"`) the dev set
          (3,000); each set is also a split of its own (`"newstest2010"`).
        - `"justice-canada"`: Canada's consolidated Acts and Regulations, aligned by
          provision (`<data_dir>/justice-canada/train.{en,fr,ids}.gz`, 544,670 pairs). No
          download: the files are made from the laws-lois-xml repository (see the README).
          Splits `"train"`, `"validation"`, `"test"` hold out whole documents (0.5% each).
        - `"python-docs-fr"`: the Python documentation and its French translation
          (`<data_dir>/python-docs-fr/train.{en,fr,ids}.gz`, 30,752 pairs); `"validation"`
          and `"test"` hold out whole pages (5% each), see `document_split`.
        - `"tfds:<name>"`: a TensorFlow Datasets builder with `en` and `fr` features, e.g.
          `"tfds:wmt14_translate/fr-en"`, stored in (or prepared into) `data_dir`. `split`
          is a TFDS split (`"val"` means `"validation"`; slices such as `"train[:1%]"`
          work).
        - `"folder:<dir>"`: a `tfds.folder_dataset.TranslateFolder` with files
          `en.<split>.txt` and `fr.<split>.txt` in `<dir>`.
        - `"files:<english_path>,<french_path>"`: two aligned text files (optionally `.gz`),
          see `load_parallel_files`; `{split}` in the paths is replaced by `split` (without
          it, every split reads the same two files).

    Args:
        corpus: str, one of the forms above.
        split: str, the split name.
        data_dir: folder with `multi30k/` and `tatoeba/`; defaults to the
            `TRANSLATOR_DATA_DIR` environment variable. For `tfds:` corpora, the TFDS data
            folder (default: TFDS's own, `~/tensorflow_datasets`).
        cache_dir: Keras cache folder for downloads (default `$KERAS_HOME` or `~/.keras`).

    Returns:
        list of `(english, french)` string tuples, in corpus order.

    Raises:
        DataError: unknown corpus or split, missing files, misaligned files, bytes that are
            not UTF-8, or no usable pair.

    Example:

    >>> pairs = load_pairs("multi30k", "test")  # doctest: +SKIP
    >>> len(pairs)  # doctest: +SKIP
    1000
    """
    if corpus == "multi30k":
        return _load_multi30k(split, data_dir, cache_dir)
    if corpus == "tatoeba":
        split = _canonical_split(corpus, split, TATOEBA_SPLITS)
        pairs = _load_tatoeba(split, data_dir, cache_dir)
        pairs = [pair for pair in pairs if tatoeba_split(pair[0]) == split]
        return _check_not_empty(pairs, f"tatoeba split {split!r}")
    if corpus == "news":
        return _load_news(split, data_dir)
    if corpus in DOCUMENT_SPLIT_PER_MILLE:
        return _load_by_document(corpus, split, data_dir)
    if corpus.startswith("tfds:"):
        return _load_tfds(corpus.removeprefix("tfds:"), split, data_dir)
    if corpus.startswith("folder:"):
        return _load_translate_folder(corpus.removeprefix("folder:"), split)
    if corpus.startswith("files:"):
        paths = corpus.removeprefix("files:").split(",")
        if len(paths) != 2:
            raise DataError(
                f"Corpus {corpus!r}: expected 'files:<english_path>,<french_path>' "
                f"(two paths separated by one comma), got {len(paths)} paths."
            )
        src_path, tgt_path = (path.strip().replace("{split}", split) for path in paths)
        return load_parallel_files(src_path, tgt_path)
    named = ["multi30k", "tatoeba", "news", *DOCUMENT_SPLIT_PER_MILLE]
    close = difflib.get_close_matches(corpus, named, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(f"Unknown corpus {corpus!r}.{hint} Valid choices: {', '.join(CORPUS_CHOICES)}.")


def load_references(corpus, split, data_dir=None, cache_dir=None):
    """Loads a split for evaluation: each English source with all its French references.

    Tatoeba has several translations for many English sentences: they are grouped under
    the first occurrence of the (exact) English sentence, for multi-reference BLEU. Every
    other corpus gives one reference per line, duplicates included, so that scores stay
    comparable with published per-line results.

    Args:
        corpus: str, as in `load_pairs`.
        split: str, as in `load_pairs`.
        data_dir: as in `load_pairs`.
        cache_dir: as in `load_pairs`.

    Returns:
        list of `(english, [french, ...])`, in order of first appearance.

    Example:

    >>> refs = load_references("tatoeba", "test")  # doctest: +SKIP
    >>> max(len(french) for _, french in refs) > 1  # doctest: +SKIP
    True
    """
    pairs = load_pairs(corpus, split, data_dir, cache_dir)
    if corpus != "tatoeba":
        return [(english, [french]) for english, french in pairs]
    grouped = {}
    for english, french in pairs:
        grouped.setdefault(english, []).append(french)
    return list(grouped.items())


def load_mixture(corpora, split, data_dir=None, seed=0, cache_dir=None):
    """Loads several corpora as one list of pairs, each repeated by its weight.

    A weight multiplies how often a corpus's pairs appear in an epoch: 1.0 once, 2.0
    twice, 0.5 a seeded random half, so an epoch stays a well-defined number of pairs
    and `make_dataset` shuffles them together. Use weight 1.0 for evaluation splits.

    Args:
        corpora: sequence of `(corpus, weight)` tuples, or corpus names (weight 1.0).
        split: str, the split to load from every corpus.
        data_dir: as in `load_pairs`.
        seed: int, seeds the sampling of fractional weights.
        cache_dir: as in `load_pairs`.

    Returns:
        list of `(english, french)` tuples, corpus after corpus.

    Example:

    >>> pairs = load_mixture([("multi30k", 1.0), ("tatoeba", 1.0)], "train")  # doctest: +SKIP
    """
    rng = random.Random(seed)
    mixture = []
    sizes = []
    for item in corpora:
        corpus, weight = (item, 1.0) if isinstance(item, str) else item
        if not weight > 0:
            raise DataError(f"Corpus {corpus!r} has weight {weight}; weights must be > 0.")
        pairs = load_pairs(corpus, split, data_dir, cache_dir)
        whole, fraction = divmod(float(weight), 1.0)
        mixture.extend(pairs * int(whole))
        mixture.extend(rng.sample(pairs, round(fraction * len(pairs))))
        sizes.append(f"{corpus} x{weight:g}: {len(pairs):,} pairs")
    logger.info("Mixture %r split: %s; %s pairs in all.", split, "; ".join(sizes), len(mixture))
    return _check_not_empty(mixture, f"mixture split {split!r}")


def load_parallel_files(src_path, tgt_path):
    """Loads two line-aligned text files (UTF-8, optionally gzip) as (english, french) pairs.

    Args:
        src_path: path of the English file, one sentence per line.
        tgt_path: path of the French file, aligned line by line with `src_path`.

    Returns:
        list of `(english, french)` tuples; pairs with an empty side are dropped (logged).

    Raises:
        DataError: a missing file, different line counts (both files and counts named),
            bytes that are not UTF-8 (file and line named), or no usable pair.

    Example:

    >>> pairs = load_parallel_files("train.en.gz", "train.fr.gz")  # doctest: +SKIP
    """
    for path in (src_path, tgt_path):
        if not os.path.isfile(path):
            raise DataError(f"Parallel file not found: {path}")
    sources = _read_lines(src_path)
    targets = _read_lines(tgt_path)
    if len(sources) != len(targets):
        raise DataError(
            "Parallel files are not aligned: "
            f"{src_path} has {len(sources):,} lines but {tgt_path} has {len(targets):,} lines."
        )
    return _drop_empty(list(zip(sources, targets, strict=True)), f"{src_path} + {tgt_path}")


def tatoeba_split(english):
    """Returns the Tatoeba split (`"train"`, `"validation"` or `"test"`) of a sentence.

    The split is a pure function of the English sentence, so it never changes when the
    corpus grows or is reordered, and all French translations of a sentence (and of its
    case and spacing variants) fall on the same side: the md5 of the NFKC-normalized,
    case-folded, whitespace-collapsed sentence, modulo 100, puts
    `TATOEBA_HELD_OUT_PERCENT` (2) buckets in "test", the next 2 in "validation" and the
    other 96 in "train". On the 73,727-pair corpus this gives 70,770 / 1,476 / 1,481 pairs
    (45,821 / 940 / 936 distinct English sentences).

    Args:
        english: str, the English sentence.

    Returns:
        str, the split name.

    Example:

    >>> tatoeba_split("Go.") == tatoeba_split("  go. ")
    True
    """
    key = " ".join(unicodedata.normalize("NFKC", english).casefold().split())
    return _hash_split(key, TATOEBA_HELD_OUT_PERCENT, 100)


def _hash_split(key, held_out, buckets):
    """ "test" for `held_out` of `buckets` MD5 buckets of `key`, "validation" for as many more,
    else "train": a split that is a pure function of the key."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % buckets
    if bucket < held_out:
        return "test"
    if bucket < 2 * held_out:
        return "validation"
    return "train"


def _local_dir(data_dir):
    return data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None


def _where_looked(data_dir, subdir, names):
    local = _local_dir(data_dir)
    wanted = " and ".join(names)
    if local is None:
        return f"no local folder was given (data_dir is None and ${DATA_DIR_ENV} is not set)"
    source = "data_dir" if data_dir is not None else f"${DATA_DIR_ENV}"
    return f"looked for {wanted} in {os.path.join(local, subdir)} (from {source})"


def _missing_corpus(corpus, split, data_dir, subdir, names, url, error):
    where = _where_looked(data_dir, subdir, names)
    return DataError(
        f"Corpus {corpus!r} split {split!r} not found: {where}, then the download from {url} "
        f"failed ({error}). Provide the files: put {' and '.join(names)} in "
        f"<folder>/{subdir}/ and set {DATA_DIR_ENV}=<folder> (or the config's `data_dir`), or "
        "run once with network access to download them into the Keras cache."
    )


def _canonical_split(corpus, split, splits):
    if split not in splits:
        raise DataError(
            f"Unknown split {split!r} for corpus {corpus!r}. Valid choices: {', '.join(splits)}."
        )
    return splits[split]


def _load_multi30k(split, data_dir, cache_dir):
    stem = _canonical_split("multi30k", split, MULTI30K_SPLITS)
    names = [f"{stem}.en.gz", f"{stem}.fr.gz"]
    local = _local_dir(data_dir)
    paths = [os.path.join(local, "multi30k", name) for name in names] if local else []
    if not (paths and all(os.path.isfile(path) for path in paths)):
        try:
            paths = [
                _download(
                    name, f"{MULTI30K_URL}/{name}", os.path.join("datasets", "multi30k"), cache_dir
                )
                for name in names
            ]
        # get_file wraps network errors in a bare Exception. Its text is in our message;
        # `from None` keeps an offline user's screen to that message, not a urllib trace.
        except Exception as error:
            raise _missing_corpus(
                "multi30k", split, data_dir, "multi30k", names, f"{MULTI30K_URL}/", error
            ) from None
    return load_parallel_files(*paths)


def _load_tatoeba(split, data_dir, cache_dir):
    local = _local_dir(data_dir)
    path = os.path.join(local, "tatoeba", "fra-eng.tsv") if local else None
    if not (path and os.path.isfile(path)):
        try:
            folder = _download("fra-eng.zip", TATOEBA_URL, "datasets", cache_dir, extract=True)
            path = _find_file(folder, "fra.txt")
        except Exception as error:
            raise _missing_corpus(
                "tatoeba", split, data_dir, "tatoeba", ["fra-eng.tsv"], TATOEBA_URL, error
            ) from None
    return _read_tsv(path)


def document_split(corpus, document):
    """Returns the split (`"train"`, `"validation"` or `"test"`) of a document of a corpus.

    Lines of one document (a law, a documentation page) are correlated, so held-out sets
    take whole documents: the MD5 of the document name, modulo 1000, puts
    `DOCUMENT_SPLIT_PER_MILLE[corpus]` buckets in "test", as many in "validation" and the
    rest in "train". The split is a pure function of the name: it never changes when the
    corpus grows.

    Args:
        corpus: str, `"justice-canada"` or `"python-docs-fr"`.
        document: str, the document name (first column of `train.ids.gz`).

    Returns:
        str, the split name.

    Example:

    >>> document_split("python-docs-fr", "library/os.po")
    'train'
    """
    return _hash_split(document, DOCUMENT_SPLIT_PER_MILLE[corpus], 1000)


def _load_by_document(corpus, split, data_dir):
    split = _canonical_split(corpus, split, DOCUMENT_SPLITS)
    names = ["train.en.gz", "train.fr.gz", "train.ids.gz"]
    local = _local_dir(data_dir)
    paths = [os.path.join(local, corpus, name) for name in names] if local else []
    if not (paths and all(os.path.isfile(path) for path in paths)):
        where = _where_looked(data_dir, corpus, names)
        raise DataError(
            f"Corpus {corpus!r} split {split!r} not found: {where}. This corpus has no "
            f"download: put {', '.join(names)} (made as the README's Corpora section says) in "
            f"<folder>/{corpus}/ and set {DATA_DIR_ENV}=<folder> (or the config's `data_dir`)."
        )
    sources, targets, documents = (_read_lines(path) for path in paths)
    for path, lines in ((paths[1], targets), (paths[2], documents)):
        if len(lines) != len(sources):
            raise DataError(
                f"{corpus} files are not aligned: {paths[0]} has {len(sources):,} lines but "
                f"{path} has {len(lines):,} lines."
            )
    documents = [line.split("\t", 1)[0] for line in documents]
    splits = {document: document_split(corpus, document) for document in set(documents)}
    kept = [
        (source, target)
        for source, target, document in zip(sources, targets, documents, strict=True)
        if splits[document] == split
    ]
    return _drop_empty(kept, f"{corpus} split {split!r}")


def _load_news(split, data_dir):
    if split not in NEWS_SPLITS:
        raise DataError(
            f"Unknown split {split!r} for corpus 'news'. Valid choices: {', '.join(NEWS_SPLITS)}."
        )
    pairs = []
    for name in NEWS_SPLITS[split]:
        pairs.extend(_load_news_set(name, data_dir))
    return pairs


def _load_news_set(name, data_dir):
    files = [f"{name}.en.gz", f"{name}.fr.gz"]
    local = _local_dir(data_dir)
    paths = [os.path.join(local, "news", file) for file in files] if local else []
    if paths and all(os.path.isfile(path) for path in paths):
        return load_parallel_files(*paths)
    test_set = SACREBLEU_NEWS_SETS[name]
    try:
        from sacrebleu.utils import get_reference_files, get_source_file

        paths = [get_source_file(test_set, "en-fr"), get_reference_files(test_set, "en-fr")[0]]
    except Exception as error:  # sacreBLEU raises SystemExit, URLError, KeyError, ...
        where = _where_looked(data_dir, "news", files)
        raise DataError(
            f"Corpus 'news' set {name!r} not found: {where}, then sacreBLEU's download of "
            f"{test_set!r} failed ({error!r}). Put {' and '.join(files)} in <folder>/news/ and "
            f"set {DATA_DIR_ENV}=<folder>, or run once with network access "
            f"(`sacrebleu -t {test_set} -l en-fr --echo src`)."
        ) from None
    return load_parallel_files(*paths)


def _download(fname, origin, cache_subdir, cache_dir, extract=False):
    if cache_dir is not None:
        # get_file silently falls back to /tmp/.keras when cache_dir is not writable yet.
        os.makedirs(cache_dir, exist_ok=True)
    return keras.utils.get_file(
        fname=fname, origin=origin, cache_subdir=cache_subdir, cache_dir=cache_dir, extract=extract
    )


def _find_file(folder, name):
    for root, _, files in sorted(os.walk(folder)):
        if name in files:
            return os.path.join(root, name)
    raise FileNotFoundError(f"no {name} in the extracted archive {folder}")


def _read_tsv(path):
    pairs = []
    for line_number, line in enumerate(_read_lines(path), start=1):
        columns = line.split("\t")
        if len(columns) < 2 and line.strip():
            raise DataError(
                f"{path}, line {line_number}: expected English<TAB>French[<TAB>attribution], "
                f"found no tab in {line[:80]!r}."
            )
        # A blank line becomes an empty pair, dropped (and counted) with the others; a
        # third column (the Tatoeba attribution) is ignored.
        pairs.append((columns[0], columns[1] if len(columns) > 1 else ""))
    return _drop_empty(pairs, path)


def _load_tfds(name, split, data_dir):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        choices = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0], choices, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise DataError(
            f"Unknown TFDS dataset {name!r}.{hint} Valid choices are the names from "
            "`tfds.list_builders()` (with a config after '/', e.g. 'wmt14_translate/fr-en')."
        ) from error
    label = f"tfds:{name}"
    _check_features(builder, label)
    try:
        builder.download_and_prepare()
    except Exception as error:
        raise DataError(
            f"Corpus {label!r}: could not find or prepare it in {builder.data_dir} ({error}). "
            "Prepare it once with network access (`tfds build`), or pass the folder holding "
            "it as `data_dir`."
        ) from error
    split = {"val": "validation"}.get(split, split)
    return _pairs_from_builder(builder, split, label)


def _load_translate_folder(root_dir, split):
    import tensorflow_datasets as tfds

    label = f"folder:{root_dir}"
    if not os.path.isdir(root_dir):
        raise DataError(f"Corpus {label!r}: folder {root_dir} does not exist.")
    builder = tfds.folder_dataset.TranslateFolder(root_dir=root_dir)
    _check_features(builder, label)
    return _pairs_from_builder(builder, split, label)


def _check_features(builder, label):
    keys = sorted(builder.info.features.keys())
    if "en" not in keys or "fr" not in keys:
        raise DataError(
            f"Corpus {label!r} has features {keys}; an English-French corpus needs 'en' and "
            "'fr' (e.g. 'tfds:wmt14_translate/fr-en')."
        )


def _pairs_from_builder(builder, split, label):
    import tensorflow_datasets as tfds

    try:
        dataset = builder.as_dataset(split=split)
    except (ValueError, KeyError) as error:
        splits = ", ".join(builder.info.splits.keys())
        raise DataError(
            f"Corpus {label!r}: no split {split!r} ({error}). Valid choices: {splits}."
        ) from error
    pairs = [
        (example["en"].decode("utf-8"), example["fr"].decode("utf-8"))
        for example in tfds.as_numpy(dataset)
    ]
    return _drop_empty(pairs, f"{label} split {split!r}")


def _read_lines(path):
    """Reads a UTF-8 text file (gzip if it ends in .gz) as a list of lines without newlines."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    lines = []
    try:
        with opener(path, "rb") as file:
            # Iterating over bytes splits on b"\n" only; str.splitlines() would also split
            # on U+2028, U+0085, ... inside a sentence and break the alignment.
            for line_number, raw in enumerate(file, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"{path}, line {line_number}: not valid UTF-8 ({error.reason} at byte "
                        f"{error.start} of the line: {raw[max(0, error.start - 10) : error.start + 10]!r}). "
                        "Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                    ) from error
                if line_number == 1:
                    line = line.removeprefix("\ufeff")
                lines.append(line.rstrip("\r\n"))
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"Cannot read {path}: {error}") from error
    return lines


def _drop_empty(pairs, name):
    """Strips both sides, drops pairs with an empty side (one log line), fails if none is left."""
    stripped = [(source.strip(), target.strip()) for source, target in pairs]
    kept = [(source, target) for source, target in stripped if source and target]
    dropped = len(pairs) - len(kept)
    if dropped:
        logger.info(
            "%s: dropped %d of %d pairs with an empty or whitespace-only side (or blank lines).",
            name,
            dropped,
            len(pairs),
        )
    return _check_not_empty(kept, name)


def _check_not_empty(pairs, name):
    if not pairs:
        raise DataError(f"{name}: no usable sentence pairs (empty corpus or split).")
    return pairs
