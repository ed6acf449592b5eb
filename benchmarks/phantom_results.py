"""Regenerate ``docs/results/``: the phantom benchmark (issue #12) of the registry's models, in both paste modes,
plus a sigma sweep and a classifier-free guidance sweep of the weighted method, and ``docs/results/README.md`` with
the exact command, seeds, model ids, sha256s, runtimes and the headline numbers.

The guidance sweep runs on its own validation seeds (``--guidance-seeds``, disjoint from ``--seeds``): the bundled
guidance scale per condition is chosen there (the scale whose outputs the reader grades as the condition asked for
most often; a tie goes to the smaller scale, which overshoots the true size less), so the headline numbers on
``--seeds`` are not tuned on their own cases.

Usage (the one documented command; resumable: re-running it continues unfinished cases, and after new weights land
the cases of the conditions they serve are recomputed: each case's fingerprint holds the registry entries, weights
sha256s included, of the models its condition uses)::

    .venv/bin/python benchmarks/phantom_results.py                      # 20 seeds per condition, --jobs 2
    .venv/bin/python benchmarks/phantom_results.py --seeds 1000-1003 --sweep-seeds 1000-1001   # a quick check

Each benchmark run is ``python -m model_training benchmark-phantoms`` (see ``model_training/README.md``); this
script only chooses the settings, runs it per paste mode and writes the README. Prints the summary table and
writes ``docs/results/results.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = ("dh_small", "dh_moderate_large", "ccs_moderate", "ccs_severe")
#: diagnostic scripts run after the benchmark (benchmarks/<name>.py; "seeds": given --seeds, else their own)
DIAGNOSTICS = {"c2st_bounds": "seeds", "paste_knobs": "seeds", "landmark_placement": None}
METHODS = ("weighted", "masked", "repaint")
RUN_TITLES = {"snapped": "Paste mode `change`, sampled latents snapped to the VQ codebook before decoding "
                         "(`--decode-quantize on`, Rombach et al.'s VQ-LDM decode; the default decodes them as is)"}


def _rel(p: Path) -> str:
    try:
        return Path(p).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(p)


def bench(out: Path, seeds: str, extra: list[str], jobs: int, dry: bool = False) -> tuple[list[str], float]:
    cmd = [sys.executable, "-m", "model_training", "benchmark-phantoms", "--seeds", seeds, "--out", _rel(out),
           "--jobs", str(jobs), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t = time.time()
    if not dry:
        subprocess.run(cmd, cwd=REPO, check=True)
    return ["python", *cmd[1:]], time.time() - t


def _cell(d, key, nd=2):
    from model_training.benchmark.report import fmt_ci

    return fmt_ci(d.get(key), nd)


def headline(summary: dict) -> str:
    rows = ["| Condition | Method | sigma (mm) | n cases | cos | cos ceiling | R^2 | sharp | geometry ratio | "
            "present | graded as asked | C2ST AUC | C2ST ceiling | FID | KID |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sig in summary["sigma"].values():
        for c in CONDITIONS:
            for m in METHODS:
                d = sig["cells"].get(c, {}).get(m)
                if not d:
                    continue
                used = "/".join(f"{v:g}" for v in d.get("sigma_mm", []))
                rows.append(f"| {c} | {m} | {used} | {d['n_cases']} | {_cell(d, 'cos')} | "
                            f"{_cell(d, 'cos_ceiling')} | "
                            f"{_cell(d, 'r2')} | {_cell(d, 'sharp')} | {_cell(d, 'geom_ratio')} | "
                            f"{_cell(d, 'present')} | {_cell(d, 'graded')} | {_cell(d, 'c2st_auc')} | "
                            f"{_cell(d, 'c2st_auc_ceiling')} | "
                            f"{_cell(d, 'fid', 1)} | {_cell(d, 'kid', 3)} |")
    return "\n".join(rows)


def sweep_table(summary: dict) -> str:
    sig = {k: v for k, v in summary["sigma"].items() if k != "model"}
    keys = sorted(sig, key=float)
    conds = [c for c in CONDITIONS if any(c in sig[k]["cells"] for k in keys)]
    rows = ["| Condition | " + " | ".join(f"{k} mm" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for c in conds:
        cells = []
        for k in keys:
            d = sig[k]["cells"].get(c, {}).get("weighted")
            cells.append("-" if not d else f"{d['cos']['mean']:.2f} / {100 * d['present']['mean']:.0f} %")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def registry_guidance(conditions) -> dict:
    """{condition: the guidance scale the registry's default weighted model uses for it} (the bundled choice)."""
    from spine_ldm import pipeline, registry as reg

    out = {}
    for c in conditions:
        try:
            out[c] = pipeline.model_guidance(reg.resolve(reg.default_model_id("weighted", c)), None, c)
        except Exception:  # noqa: BLE001 - a registry without a weighted model for c: nothing to mark
            pass
    return out


def guidance_table(summaries: dict, chosen: dict) -> str:
    """One row per condition x scale of the guidance sweep: cos, R^2, geometry ratio, present, graded as asked;
    the registry's scale in bold."""
    rows = ["| Condition | guidance | cos | R^2 | geometry ratio | present | graded as asked |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted(summaries, key=float)
    for c in CONDITIONS:
        for k in keys:
            d = summaries[k]["sigma"].get("model", {}).get("cells", {}).get(c, {}).get("weighted")
            if not d:
                continue
            mark = "**" if abs(chosen.get(c, float("nan")) - float(k)) < 1e-9 else ""
            rows.append(f"| {c} | {mark}{k}{mark} | {_cell(d, 'cos')} | {_cell(d, 'r2')} | "
                        f"{_cell(d, 'geom_ratio')} | {_cell(d, 'present')} | {_cell(d, 'graded')} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1000-1019", help="benchmark seeds (default %(default)s: 20 per condition)")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--paste-modes", default="change,blend")
    ap.add_argument("--sweep-seeds", default="1000-1005", help="seeds of the sigma sweep ('' = no sweep)")
    ap.add_argument("--sweep", default="6,8,12,16,24")
    ap.add_argument("--sweep-conditions", default="dh_small,dh_moderate_large,ccs_severe")
    ap.add_argument("--guidance-seeds", default="2000-2019",
                    help="validation seeds of the guidance sweep, disjoint from --seeds ('' = no sweep)")
    ap.add_argument("--guidance-sweep", default="1,1.25,1.5,1.75,2,2.5", help="guidance scales of the sweep")
    ap.add_argument("--guidance-conditions", default="dh_small,dh_moderate_large")
    ap.add_argument("--no-snapped", action="store_true",
                    help="skip the weighted run that snaps sampled latents to the codebook (--decode-quantize on)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--figure-cases", type=int, default=3, help="case rows of the first paste mode's grids")
    ap.add_argument("--out", default=str(REPO / "docs" / "results"))
    ap.add_argument("--extra", default="", help="more benchmark-phantoms options, e.g. '--repaint-resample 10'")
    ap.add_argument("--no-diagnostics", action="store_true",
                    help="skip the diagnostic scripts (benchmarks/c2st_bounds.py, paste_knobs.py, landmark_placement.py)")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the runs and diagnostics of the existing results.json that this invocation does not "
                         "rerun (e.g. only the headline run after new weights; the Models table then says which "
                         "run measured which weights)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--readme-only", action="store_true",
                    help="rewrite README.md from the runs recorded in results.json (no benchmark runs)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    extra = args.extra.split() if args.extra else []
    if args.readme_only:
        rec = json.loads((out / "results.json").read_text())
        runs = rec["runs"]
        summaries = {k: json.loads((out / v["folder"] / "summary.json").read_text()) for k, v in runs.items()}
        write_readme(out, runs, summaries, rec.get("argv", []), rec.get("diagnostics"), rec.get("guidance"))
        return 0
    kept = json.loads((out / "results.json").read_text()) if args.keep_others and \
        (out / "results.json").is_file() else {}
    runs = dict(kept.get("runs", {}))
    for i, mode in enumerate(m.strip() for m in args.paste_modes.split(",") if m.strip()):
        figs = ["--figure-cases", str(args.figure_cases if i == 0 else 0)]  # case grids for the first mode only
        cmd, sec = bench(out / f"phantom_{mode}", args.seeds,
                         ["--samples", str(args.samples), "--paste-mode", mode, *figs, *extra], args.jobs,
                         args.dry_run)
        runs[mode] = {"command": cmd, "wall_seconds": round(sec, 1), "folder": f"phantom_{mode}"}
    if not args.no_snapped:  # the default decode (the latent as is) against the VQ-LDM convention
        cmd, sec = bench(out / "phantom_snapped", args.seeds,
                         ["--samples", str(args.samples), "--paste-mode", "change", "--decode-quantize", "on",
                          "--methods", "weighted", "--figure-cases", "0", *extra], args.jobs, args.dry_run)
        runs["snapped"] = {"command": cmd, "wall_seconds": round(sec, 1), "folder": "phantom_snapped"}
    if args.sweep_seeds:
        cmd, sec = bench(out / "sigma_sweep", args.sweep_seeds,
                         ["--samples", "2", "--methods", "weighted", "--conditions", args.sweep_conditions,
                          "--sigma-sweep", args.sweep, "--figure-cases", "0", *extra], args.jobs, args.dry_run)
        runs["sigma_sweep"] = {"command": cmd, "wall_seconds": round(sec, 1), "folder": "sigma_sweep"}
    guidance = dict(kept.get("guidance") or {})
    if args.guidance_seeds:
        guidance = {"seeds": args.guidance_seeds, "scales": {}}
        for g in (float(v) for v in args.guidance_sweep.split(",") if v.strip()):
            folder = f"guidance_sweep/g{g:g}"  # FID/KID off: the sweep picks a scale by shape and grade
            cmd, sec = bench(out / folder, args.guidance_seeds,
                             ["--samples", str(args.samples), "--methods", "weighted", "--conditions",
                              args.guidance_conditions, "--guidance-scale", f"{g:g}", "--features", "none",
                              "--figure-cases", "0", *extra], args.jobs, args.dry_run)
            guidance["scales"][f"{g:g}"] = {"command": cmd, "wall_seconds": round(sec, 1), "folder": folder}
    diagnostics = dict(kept.get("diagnostics") or {})
    for name, more in DIAGNOSTICS.items() if not args.no_diagnostics else ():
        cmd = [sys.executable, f"benchmarks/{name}.py", *(["--seeds", args.seeds] if more == "seeds" else []),
               "--out", _rel(out / f"{name}.json")]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.time()
        if not args.dry_run:
            subprocess.run(cmd, cwd=REPO, check=True)
        diagnostics[name] = {"command": ["python", *cmd[1:]], "wall_seconds": round(time.time() - t, 1),
                             "file": f"{name}.json"}
    if args.dry_run:
        return 0
    summaries = {k: json.loads((out / v["folder"] / "summary.json").read_text()) for k, v in runs.items()}
    argv = list(argv if argv is not None else sys.argv[1:])
    write_readme(out, runs, summaries, argv, diagnostics, guidance)
    (out / "results.json").write_text(json.dumps({"argv": argv, "runs": runs, "diagnostics": diagnostics,
                                                  "guidance": guidance, "models": {
                                                      k: s["models"] for k, s in summaries.items()}}, indent=2) + "\n")
    for k, s in summaries.items():
        if k != "sigma_sweep":
            print(f"\n## paste mode {k}\n" + headline(s))
    return 0


def model_rows(summaries: dict) -> dict:
    """{(model id, autoencoder sha256, unet sha256): (method, [runs that used those weights])}: one row per set
    of weights, so runs kept from before new weights (``--keep-others``) show which weights they measured."""
    rows: dict = {}
    for k, s in summaries.items():
        for mid, v in s["models"].items():
            sh = v.get("weights_sha256") or {}
            key = (mid, sh.get("autoencoder", ""), sh.get("unet", ""))
            rows.setdefault(key, (v["method"], []))[1].append(k)
    return rows


def write_readme(out: Path, runs: dict, summaries: dict, argv, diagnostics: dict | None = None,
                 guidance: dict | None = None) -> None:
    first = next(iter(summaries.values()))
    reader = first["meta"].get("reader") or {}
    lines = [
        "# Phantom benchmark results (issue #12)", "",
        "Generated by `benchmarks/phantom_results.py` (do not edit by hand). Regenerate with:", "",
        "```bash", ".venv/bin/python benchmarks/phantom_results.py" + (" " + " ".join(argv) if argv else ""), "```",
        "",
        "What is measured (details: `model_training/README.md`, section *Phantom benchmark*): each seed's healthy "
        "phantom is inpainted at its pathological twin's landmark, and every output is compared with the twin "
        "(`cos`, `R^2` of the change, sharpness, a geometry rule), read by the pathology-present reader and the "
        "C2ST realism reader, and FID / KID / MS-SSIM are computed per condition x method. `cos ceiling` is what a "
        "perfect diffusion model could reach with the same autoencoder, grid and paste-back.", "",
        "## Runs", ""]
    for k, r in runs.items():
        s = summaries[k]
        lines.append(f"- **{k}** ([tables](./{r['folder']}/table1.md), [Table 2](./{r['folder']}/table2.md), "
                     f"[figures](./{r['folder']}/figures/), [per output](./{r['folder']}/results.csv)): "
                     f"`{' '.join(r['command'])}`; {s['n_cases']} cases, seeds {s['settings']['seeds']}; "
                     f"{s['case_seconds_total'] / 60:.1f} min wall time summed over cases "
                     f"({s.get('case_cpu_seconds_total', float('nan')) / 60:.1f} CPU min; "
                     f"{s['meta'].get('cpu_count')} CPUs shared with other jobs).")
    lines += ["", "## Models", "", "| id | method | autoencoder sha256 | unet sha256 | runs |", "|---|---|---|---|---|"]
    for (mid, ae, un), (method, names) in sorted(model_rows(summaries).items()):
        lines.append(f"| `{mid}` | {method} | `{ae}` | `{un}` | {', '.join(names)} |")
    lines += ["", f"Reader: `{reader.get('id')}` (sha256 `{reader.get('sha256')}`), held-out present accuracy "
                  f"{(reader.get('heldout') or {}).get('present_accuracy', float('nan')):.3f}.", ""]
    for k, s in summaries.items():
        if k == "sigma_sweep":
            continue
        title = RUN_TITLES.get(k, f"Paste mode `{k}`")
        lines += [f"## {title} (mean [95 % CI over cases])", "", headline(s), "",
                  f"![summary](./{runs[k]['folder']}/figures/summary.png)", ""]
        for c in CONDITIONS:
            if (out / runs[k]["folder"] / "figures" / f"{c}.png").is_file():
                lines.append(f"- [{c}](./{runs[k]['folder']}/figures/{c}.png)")
        lines.append("")
    if "sigma_sweep" in runs:
        lines += ["## Sigma sweep (weighted)", "",
                  "Each weighted model sampled at other sigmas than its own (the pipeline warns then): cos / present "
                  "rate (mean over cases).", "", sweep_table(summaries["sigma_sweep"]), "",
                  f"![sigma sweep](./{runs['sigma_sweep']['folder']}/figures/sigma_sweep.png)", ""]
    scales = (guidance or {}).get("scales") or {}
    if scales and all((out / v["folder"] / "summary.json").is_file() for v in scales.values()):
        gs = {k: json.loads((out / v["folder"] / "summary.json").read_text()) for k, v in scales.items()}
        first_cmd = next(iter(scales.values()))["command"]
        conds = [c for c in CONDITIONS if any(c in s["sigma"].get("model", {}).get("cells", {}) for s in gs.values())]
        lines += ["## Guidance sweep (weighted, validation seeds)", "",
                  f"Classifier-free guidance against the healthy condition at each scale, seeds {guidance['seeds']} "
                  f"(disjoint from the headline seeds), {first_cmd[first_cmd.index('--samples') + 1]} samples per "
                  f"case, FID/KID off (`{' '.join(first_cmd)}`, one run per scale: "
                  f"`{'`, `'.join(v['folder'] for v in scales.values())}`). The registry's scale per condition (bold) "
                  "is the one whose outputs the reader grades as the condition asked for most often; a tie goes to "
                  "the smaller scale, which overshoots the true size less (`cos` is blind to size; a larger scale "
                  "draws a larger, darker herniation: geometry ratio and R^2).", "",
                  guidance_table(gs, registry_guidance(conds)), ""]
    for name, d in (diagnostics or {}).items():
        if not (out / d["file"]).is_file():
            continue
        mod = __import__(name)  # benchmarks/<name>.py, next to this script
        lines += [f"## {mod.TITLE}", "", f"`{' '.join(d['command'])}` ({d['wall_seconds'] / 60:.1f} min, "
                  f"[per case](./{d['file']})). " + mod.TEXT, "", mod.table(json.loads((out / d["file"]).read_text())),
                  ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
