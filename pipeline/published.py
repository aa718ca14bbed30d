"""Published numbers (docs/method.md), as data: ZSL top-1 and GZSL U, S, H in %, on the xlsa17
proposed split with ResNet101 features. Shown beside our runs only where the dataset and the
backbone match; a blank is a number the paper (or its abstract) does not give."""
from __future__ import annotations

BACKBONE = "resnet101"
SOURCE = "the papers, as listed in docs/method.md (ResNet101 features; ZSL top-1 / GZSL U, S, H in %)"
METRICS = ("ZSL", "U", "S", "H")


def _row(zsl, u, s, h) -> dict:
    return dict(zip(METRICS, (zsl, u, s, h)))


PUBLISHED: dict[str, dict[str, dict[str, float | None]]] = {
    "DAZLE (CVPR20)": {"CUB": _row(66.0, 56.7, 59.6, 58.1), "SUN": _row(59.4, 52.3, 24.3, 33.2),
                       "AWA2": _row(67.9, 60.3, 75.7, 67.1)},
    "TransZero (AAAI22)": {"CUB": _row(76.8, 69.3, 68.3, 68.8), "SUN": _row(65.6, 52.6, 33.4, 40.8),
                           "AWA2": _row(70.1, 61.3, 82.3, 70.2)},
    "MSDN (CVPR22)": {"CUB": _row(76.1, 68.7, 67.5, 68.1), "SUN": _row(65.8, 52.2, 34.2, 41.3),
                      "AWA2": _row(70.1, 62.0, 74.5, 67.7)},
    "TransZero++": {"CUB": _row(78.3, 67.5, 73.6, 70.4), "SUN": _row(67.6, 48.6, 37.8, 42.5),
                    "AWA2": _row(72.6, 64.6, 82.7, 72.5)},
    # the MSDN++ abstract gives ZSL and H only (and U on FLO)
    "MSDN++ (2026)": {"CUB": _row(78.5, None, None, 70.6), "SUN": _row(67.5, None, None, 42.1),
                      "AWA2": _row(73.4, None, None, 72.5), "FLO": _row(None, 69.2, None, None)},
}


def published_for(dataset: str, backbone: str) -> dict[str, dict[str, float | None]]:
    """{method: {metric: value}} for a dataset, when `backbone` is the papers' backbone."""
    if backbone != BACKBONE:
        return {}
    return {method: numbers[dataset] for method, numbers in PUBLISHED.items() if dataset in numbers}
