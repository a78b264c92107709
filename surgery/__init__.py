"""ELBO surgery: the exact decomposition of a VAE's ELBO over a whole split (Hoffman & Johnson 2016).

`decompose(model, data)` returns a `SurgeryReport` (`surgery.text.format_table` prints it);
`python -m surgery checkpoint=PATH` runs it on a saved model. See docs/surgery.md.
"""

from surgery.decomposition import (
    AggregateTerms,
    Estimate,
    SurgeryReport,
    aggregate_terms,
    decompose,
    encode,
    importance_log_likelihood,
    terms_by_size,
)

__all__ = [
    "AggregateTerms",
    "Estimate",
    "SurgeryReport",
    "aggregate_terms",
    "decompose",
    "encode",
    "importance_log_likelihood",
    "terms_by_size",
]
