"""The summary table of scripts/gpu_check.sh, from the files it leaves in its output folder.

    python -m trpr.benchmarks.gpu_check_summary OUT_DIR      # markdown on stdout (the script saves it as summary.md)

Standard library only (it runs last, whatever failed before). Reads OUT_DIR/steps.tsv (step, exit status, seconds, note), log.txt (device line, pytest summary line),
throughput.json (benchmarks.train_throughput), e2e_metrics.jsonl (the end-to-end run's epoch records with
their per-phase times), leaderboard.md and bench/kernels_gpu_quick.json; a missing, truncated or
malformed file is said, never fatal (a step killed at its limit can leave one). A "Fallbacks and
failures" section lists the preflight's failures, the wheels line and every "FALLBACK: ..." note of the
kernel benchmark (out_dtype probe, compile off, Triton missing).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def read_json(path: Path) -> tuple[dict | None, str]:
    """(the JSON object at `path`, "") or (None, why not: missing / truncated or malformed)."""
    if not path.exists():
        return None, f"no {path.name}"
    try:
        value = json.loads(path.read_text(errors="replace"))
    except ValueError as error:
        return None, f"{path.name}: truncated or malformed ({error}); the step was probably killed"
    if not isinstance(value, dict):
        return None, f"{path.name}: not a JSON object"
    return value, ""


def format_table(rows: list[dict]) -> str:
    """The markdown table of benchmarks.train_throughput (steps-only and loop rows side by side)."""
    def number(value, pattern):
        return "–" if value is None else pattern.format(value)

    lines = ["| mode | compile | batch | steps | s/step | pair-samples/s | TFLOP/s | MFU | data wait s | warm-up s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.get("status", "ok") != "ok" or "seconds_per_step" not in row:
            lines.append(f"| {row.get('mode', '?')} | {row.get('compile', '?')} | {row.get('batch_size', '?')} "
                         f"| – | – | – | – | – | – | {row.get('status', 'incomplete row')} |")
            continue
        lines.append(f"| {row['mode']} | {row['compile']} | {row['batch_size']} | {row['steps']} "
                     f"| {row['seconds_per_step']:.4f} | {row['pair_samples_per_s']:.4g} "
                     f"| {row['achieved_tflops']:.2f} | {number(row['mfu'], '{:.1%}')} "
                     f"| {number(row['data_wait_s'], '{:.2f}')} | {row['warmup_s']:.1f} |")
    return "\n".join(lines)


TIME_COLUMNS = (("ALR", "alr_s"), ("data wait", "data_wait_s"), ("compute", "compute_s"),
                ("validation", "validation_s"), ("ckpt", "checkpoint_s"), ("ckpt write (bg)", "checkpoint_write_s"),
                ("epoch", "epoch_s"))


def steps_table(out: Path) -> list[str]:
    lines = ["| step | exit | seconds | note |", "|---|---|---:|---|"]
    path = out / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, note = (line.split("\t") + [""] * 4)[:4]
        lines.append(f"| {name} | {status} | {seconds} | {note} |")
    return lines


def device_lines(out: Path) -> list[str]:
    log = out / "log.txt"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if line.startswith(("python ", "GPU "))][:2] or ["device: unknown"]


def pytest_summary(out: Path) -> str:
    log = out / "log.txt"
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error)[^\n]*?)\s*=*$", text, flags=re.MULTILINE)
    return found[-1] if found else "no pytest summary line"


def epoch_table(out: Path) -> list[str]:
    """Per epoch of the end-to-end run: the phases (seconds), the two rates and their ratio."""
    path = out / "e2e_metrics.jsonl"
    if not path.exists():
        return ["no e2e_metrics.jsonl (the end-to-end run did not finish an epoch)"]
    header = "| epoch | loss A | loss B | " + " | ".join(label for label, _ in TIME_COLUMNS) \
        + " | steps samples/s | epoch samples/s | epoch ÷ steps |"
    lines = [header, "|" + "---:|" * (3 + len(TIME_COLUMNS) + 3)]
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
            float(record["loss_a"]), float(record["loss_b"]), record["epoch"]
        except (ValueError, KeyError, TypeError):
            lines.append(f"| line {number}: truncated or malformed record |" + " |" * (2 + len(TIME_COLUMNS) + 3))
            continue
        timing = record.get("time") or {}
        steps, whole = timing.get("steps_samples_per_s"), timing.get("epoch_samples_per_s")
        cells = [str(record["epoch"]), f"{record['loss_a']:.4f}", f"{record['loss_b']:.4f}"]
        cells += [f"{timing[key]:.2f}" if timing.get(key) is not None else "–" for _, key in TIME_COLUMNS]
        cells += [f"{steps:.1f}" if steps else "–", f"{whole:.1f}" if whole else "–",
                  f"{whole / steps:.1%}" if steps and whole else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bench_tables(out: Path) -> list[str]:
    report, problem = read_json(out / "bench" / "kernels_gpu_quick.json")
    if report is None:
        return [f"{problem} (kernel benchmark; see log.txt)"]
    rows = {(r["loss"], r["B"], r["D"], r["impl"]): r for r in report.get("losses", [])
            if isinstance(r, dict) and {"loss", "B", "D", "impl", "status"} <= r.keys()}

    def cell(row, key):
        if row is None:
            return "–"
        if row["status"] != "ok":
            return row["status"]
        return f"{row[key]:.2f}" if row.get(key) is not None else "–"

    lines = ["| loss | B | D | triton ms | eager ms | compile ms | triton MiB | eager MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (loss, b, d, impl), row in rows.items():
        if impl != "triton":
            continue
        eager, compiled = rows.get((loss, b, d, "eager")), rows.get((loss, b, d, "torch.compile"))
        lines.append(f"| {loss} | {b} | {d} | {cell(row, 'ms')} | {cell(eager, 'ms')} | {cell(compiled, 'ms')} "
                     f"| {cell(row, 'peak_mib')} | {cell(eager, 'peak_mib')} |")
    lines += ["", "| retrieval | impl | median ms | status |", "|---|---|---:|---|"]
    for row in report.get("retrieval", []):
        ms = f"{row['ms']:.1f}" if row.get("ms") is not None else "–"
        lines.append(f"| {row.get('size', '?')} | {row.get('impl', '?')} | {ms} | {row.get('status', '?')} |")
    return lines


def fallback_lines(out: Path) -> list[str]:
    """The preflight's failed / absent checks, the wheels line, and the kernel benchmark's FALLBACK notes."""
    log = out / "log.txt"
    text = log.read_text(errors="replace") if log.exists() else ""
    found = [line for line in text.splitlines()
             if (line.startswith("preflight ") and " ok - " not in line) or line.startswith("wheels: ")]
    report, _ = read_json(out / "bench" / "kernels_gpu_quick.json")
    found += [note for note in (report or {}).get("notes", []) if str(note).startswith("FALLBACK")]
    throughput, _ = read_json(out / "throughput.json")
    if throughput is not None and throughput.get("complete") is False:
        found.append("throughput.json is incomplete: the throughput step ended before its last row")
    return [f"- {line}" for line in found] or ["none"]


def summary(out: Path) -> str:
    lines = ["# GPU check summary", ""] + device_lines(out) + ["", "## Steps", ""] + steps_table(out)
    lines += ["", "## Fallbacks and failures", ""] + fallback_lines(out)
    lines += ["", "## Training throughput (benchmarks.train_throughput)", ""]
    result, problem = read_json(out / "throughput.json")
    if result is not None:
        lines += [f"{result.get('device', '?')}, {result.get('precision', '?')}, "
                  f"{result.get('gflops_per_pair_sample') or 0:.1f} GFLOP per "
                  f"pair-sample, peak memory {result.get('peak_memory_gib') or 0:.1f} GiB", ""]
        lines += format_table([r for r in result.get("rows", []) if isinstance(r, dict)]).splitlines()
    else:
        lines.append(problem)
    lines += ["", "## End-to-end run (per-phase seconds per epoch)", ""] + epoch_table(out)
    leaderboard = out / "leaderboard.md"
    lines += ["", f"leaderboard.md: {'written' if leaderboard.exists() else 'missing'}",
              f"kernel tests: {pytest_summary(out)}", "", "## Kernel benchmark (quick)", ""] + bench_tables(out)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m trpr.benchmarks.gpu_check_summary OUT_DIR")
    print(summary(Path(argv[0])), end="")


if __name__ == "__main__":
    main()
