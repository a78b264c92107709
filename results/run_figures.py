"""Per-run figures for results/README.md: epochs, time, val ELBO at a common epoch, surgery numbers.

    python results/run_figures.py EPOCH RUN_DIR...

EPOCH is the epoch at which every run's validation ELBO is printed side by side. Each
RUN_DIR holds the run's surgery.json and metrics.jsonl.
"""

import json
import statistics
import sys
from pathlib import Path

from lab.report import epochs_trained

common = int(sys.argv[1])
for run in sys.argv[2:]:
    run = Path(run)
    s = json.loads((run / "surgery.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_epoch = {line["epoch"]: line for line in lines}
    best = max(lines, key=lambda line: line["val_elbo"])
    print(
        f"{run.name}: prior {s['prior']}, epochs {epochs_trained(run / 'metrics.jsonl')}, best epoch {best['epoch']} "
        f"(val ELBO {best['val_elbo']:.2f}), val ELBO at epoch {common} {by_epoch[common]['val_elbo']:.2f}, "
        f"seconds per epoch: median {statistics.median(line['seconds'] for line in lines):.1f}, "
        f"total {sum(line['seconds'] for line in lines):.0f}; ELBO {s['elbo']:.2f}, avg KL {s['avg_kl']:.2f}, "
        f"MI {s['mutual_info']:.2f}, mKL {s['marginal_kl']:.2f} +- {s['marginal_kl_stderr']:.2f}, "
        f"log p(x) {s['log_likelihood']:.2f} +- {s['log_likelihood_stderr']:.2f} "
        f"(K={s['is_samples']}, {s['is_points']} pts); surgery seconds {json.dumps(s['seconds'])}"
    )
