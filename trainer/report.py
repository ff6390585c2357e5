"""The end-of-run summary a person reads."""

from __future__ import annotations

from typing import Any

from accelerate.state import PartialState

from trainer.config import Config
from trainer.cxr_metrics import format_table


def format_results(results: dict[str, Any], cfg: Config) -> str:
    lines = [f"run folder: {cfg.train.output_dir}"]
    for split, result in results.items():
        if split == "early_stopping":
            lines.append(
                f"early stopping on val {result['metric']} ({result['mode']}): best "
                f"{result['best']:.4f} at step {result['best_step']}, stopped at step "
                f"{result['stopped_at']}; the weights are the best step's"
            )
            continue
        if "mauc" in result:
            ci = result.get("mauc_ci")
            interval = "" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"
            mauc = "n/a" if result["mauc"] is None else f"{result['mauc']:.4f}"
            lines.append(f"{split}: mAUC {mauc}{interval}  mean ACC {result['mean_acc']:.4f}")
            lines.append(format_table(result))
        elif "acc" in result:
            auc = "n/a" if result["auc"] is None else f"{result['auc']:.4f}"
            lines.append(
                f"{split}: ACC {result['acc']:.4f}  macro-AUC {auc}  "
                f"P {result['precision']:.4f}  R {result['recall']:.4f}  F1 {result['f1']:.4f}  "
                f"(n={result['n']})"
            )
            for cohort, r in result.get("per_cohort", {}).items():
                c_auc = "n/a" if r["auc"] is None else f"{r['auc']:.4f}"
                lines.append(
                    f"  {cohort:<8} ACC {r['acc']:.4f}  macro-AUC {c_auc}  F1 {r['f1']:.4f}  (n={r['n']})"
                )
        else:
            losses = "  ".join(
                f"{k} {v:.4f}" for k, v in sorted(result.items()) if k.endswith("_loss")
            )
            lines.append(f"{split}: {losses}")
            recall = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
            if all(k in result for k in recall):
                lines.append(
                    f"{split} retrieval: "
                    + "  ".join(f"{k} {result[k]:.4f}" for k in recall)
                    + f"  (n={result['retrieval_n']})"
                )
            if "zero_shot" in result:
                zs = result["zero_shot"]
                ci = zs.get("mauc_ci")
                interval = "" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"
                mauc = "n/a" if zs["mauc"] is None else f"{zs['mauc']:.4f}"
                lines.append(f"{split} zero-shot: mAUC {mauc}{interval}")
    return "\n".join(lines)


def print_results(results: dict[str, Any], cfg: Config) -> None:
    if PartialState().is_main_process:
        print(format_results(results, cfg), flush=True)
