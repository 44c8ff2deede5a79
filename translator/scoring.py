"""Corpus-level translation scores with sacreBLEU: cased BLEU and chrF."""

from __future__ import annotations


def bleu_chrf(hypotheses, references):
    """Cased sacreBLEU BLEU and chrF; `references` is a list of reference lists per sentence.

    Returns:
        `(bleu, chrf, bleu_signature, chrf_signature)`: the two sacreBLEU score objects
        (`.score` is the number) and their signatures.
    """
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, streams)
    c = chrf.corpus_score(hypotheses, streams)
    return b, c, bleu.get_signature(), chrf.get_signature()
