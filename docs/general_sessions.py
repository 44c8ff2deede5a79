"""Draws docs/en-fr-general-sessions.png: the general model's dev BLEU across its training sessions.

Each session continued (`--init-from`) from the checkpoint the one before it kept, so the x axis
chains them: a session starts at the step count of the checkpoint it started from. Dev is
newstest2013's first 600 sentences, beam 5, length penalty 1.5 (the config's validation). The
figures are those of the model card (saved_models/en-fr/README.md), copied here because
the run directories are not kept in the repository.

    python docs/general_sessions.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (label, [(step, BLEU) at each validation], the step of the checkpoint kept for the next session)
SESSIONS = [
    (
        "1: from scratch",
        [(500, 0.63), (1000, 1.41), (2000, 5.14), (2500, 5.11), (2660, 5.60)],
        2660,
    ),
    (
        "2: peak 0.001",
        [(500, 6.45), (1000, 8.20), (1500, 8.91), (2000, 10.17), (2500, 10.07), (2904, 10.02)],
        2904,
    ),
    (
        "3: anneal 0.0006",
        [(500, 10.21), (1000, 10.46), (1500, 11.58), (2000, 11.92), (2500, 12.67), (2700, 12.55)],
        2500,
    ),
    (
        "4: anneal 0.0004",
        [(500, 12.80), (1000, 13.06), (1500, 13.35), (2000, 14.39), (2500, 14.18), (2569, 14.25)],
        2000,
    ),
    (
        "5: more captions",
        [(500, 13.51), (1000, 13.78), (1500, 13.71), (2000, 14.23), (2100, 14.10)],
        2000,
    ),
    (
        "6: bfloat16, dropout 0.1",
        [
            (500, 13.45),
            (1000, 14.36),
            (1500, 14.99),
            (2000, 15.31),
            (2500, 15.57),
            (3000, 15.73),
            (3500, 16.34),
            (4000, 16.37),
            (4500, 16.33),
            (4559, 16.75),
        ],
        4559,
    ),
    (
        "7: more captions, kept by 3 dev sets",
        [
            (500, 15.24),
            (1000, 15.29),
            (1500, 15.49),
            (2000, 15.72),
            (2500, 16.24),
            (3000, 15.94),
            (3500, 16.38),
            (4000, 16.80),
            (4500, 16.81),
            (5000, 16.72),
        ],
        4500,
    ),
    (
        "8: more captions, anneal 0.0003 (shipped)",
        [
            (500, 16.15),
            (1000, 16.11),
            (1500, 16.79),
            (2000, 16.86),
            (2500, 16.15),
            (3000, 17.16),
            (3500, 16.85),
            (4000, 17.35),
            (4500, 17.28),
            (5000, 17.13),
        ],
        5000,
    ),
]


def main(path=Path(__file__).parent / "en-fr-general-sessions.png"):
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    offset = 0
    for label, points, kept in SESSIONS:
        if not points:
            continue
        x = [offset + step for step, _ in points]
        y = [bleu for _, bleu in points]
        ax.plot(x, y, "o-", label=f"session {label}")
        if kept is not None:
            offset += kept
    ax.set(
        title="en-fr, the shipped model: dev BLEU by session (newstest2013[:600], beam 5)",
        xlabel="optimizer steps, sessions chained from each one's kept checkpoint",
        ylabel="BLEU",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
