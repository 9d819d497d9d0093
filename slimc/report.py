"""``report.md``: the manifest, written for a person."""

from __future__ import annotations

from typing import Any


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _coverage(pipeline: list[dict[str, Any]]) -> list[str]:
    """Per compressing pass: the share of weight bytes it reached and what it left, and why."""
    entries = [p for p in pipeline if isinstance(p.get("summary"), dict)
               and "coverage" in p["summary"]]
    if not entries:
        return []
    lines = ["", "## Weight coverage", ""]
    for p in entries:
        cov = p["summary"]["coverage"]
        lines.append(f"- `{p['pass']}` reached **{100 * cov['reached_fraction']:.1f}%** of the "
                     f"float weight bytes ({cov['reached_bytes']:,} of {cov['weight_bytes']:,}).")
        for group in cov["untouched"]:
            examples = ", ".join(f"`{e}`" for e in group["examples"])
            more = ", ..." if group["tensors"] > len(group["examples"]) else ""
            lines.append(f"  - untouched: {group['bytes']:,} bytes in {group['tensors']} "
                         f"tensor(s): {group['reason']} ({examples}{more})")
    return lines


def _distillation(pipeline: list[dict[str, Any]]) -> list[str]:
    """What each ``distill`` pass trained and what it recovered on held-out calibration data."""
    entries = [p for p in pipeline if p["pass"] == "distill" and isinstance(p.get("summary"),
                                                                           dict)]
    if not entries:
        return []
    lines = ["", "## Distillation", ""]
    for p in entries:
        d = p["summary"]
        trained = (f"LoRA rank {d['lora']} adapters ({d['trained_params']:,} params) on "
                   f"{d['trained_tensors']} tensor(s), folded back into them" if d["lora"]
                   else f"{d['trained_params']:,} params in {d['trained_tensors']} tensor(s)")
        which = d["trainable"] + (" + quantized grids" if d.get("scales") else "")
        lines.append(f"- teacher: {d['teacher']}; trained ({which}): {trained}; "
                     f"{d['steps']} steps on {d['train_batches']} calibration batches "
                     f"({d['train_tokens_seen']:,} tokens seen), {d['seconds']:.1f}s.")
        lines.append(f"- held-out loss ({d['held_out_batches']} calibration batches never "
                     f"trained on; {d['held_out_loss']}): {d['held_out_loss_before']:.4g} -> "
                     f"{d['held_out_loss_after']:.4g}, **recovered {d['recovered']:.1%}**"
                     + ("" if d["kept"] else "; not better, so the weights were left as they "
                        "were") + ".")
        for why, count in d["frozen"].items():
            lines.append(f"- left frozen: {count:,} params, {why}.")
    return lines


def _lossless(exact: dict[str, Any] | None) -> list[str]:
    """Weights found already on a format's grid, and whether that lossless choice was kept."""
    if not exact:
        return []
    formats = ", ".join(f"{name} x{count}" for name, count in exact["exact"].items())
    found = (f"{sum(exact['exact'].values())} of {exact['layers']} weights already lie on a "
             f"format's grid ({formats})")
    size = exact["relative"]["size"]
    if exact["used"]:
        return [f"{found}: stored in those formats and fp32 elsewhere (size {size:.3f}) they "
                "lose nothing and fit the budget, so the search ended there without measuring "
                "its damage table.", ""]
    return [f"{found}; that lossless choice (size {size:.3f}) was not taken: "
            f"{exact.get('why_not')}. The damage table prices those choices at zero.", ""]


def _search(entry: dict[str, Any] | None) -> list[str]:
    """What the budget / -O search tried and why it chose what it chose."""
    if not entry:
        return []
    metric = entry["metric"]
    lines = ["", "## Budget search", "",
             f"Asked for: {entry['request']}. Algorithm: {entry['algorithm']}.",
             f"Quality measured as: {metric['label']} (original {metric['original']:.4g}).",
             f"Target costs: {entry['hardware'] or 'not needed'}.", ""]
    lines += _lossless(entry.get("lossless"))
    chosen = entry.get("chosen")
    if chosen:
        lines.append(f"Chosen (recipe: `{entry.get('recipe', 'recipe.yaml')}`): "
                     f"`{chosen['pipeline']}`; per-layer choices "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(chosen["choices"].items()))
                     + ".")
    else:
        lines.append("Nothing met the request; see the candidates.")
    lines += ["", "| candidate | size | params | latency | value | drop | back-offs |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for c in entry["candidates"]:
        r = c["relative"]
        lat = f"{r['latency']:.3f}" if "latency" in r else "-"
        lines.append(f"| `{c['pipeline']}` | {r['size']:.3f} | {r['params']:.3f} | {lat} | "
                     f"{c['value']:.4g} | {c['drop']:.2%} | {c['backoffs']} |")
    for failure in entry.get("failures") or []:
        lines.append(f"- {failure}")
    recovery = entry.get("distillation")
    if recovery:
        lines.append("")
        done = (chosen or {}).get("distill")
        if done:
            lines.append(f"Nothing met --max-drop by compression alone; **distillation** from "
                         f"the original model on --calib ({done['steps']} steps, lr "
                         f"{done['lr']:g}, {done['seconds']:.0f} s"
                         + (f"; trained {done['trained']}, {done['where']}"
                            if done.get("trained") else "")
                         + ") brought the drop from "
                         f"{done['drop_before']:.2%} to {done['drop_after']:.2%} "
                         f"(measured on {done['measured_on']}).")
        else:
            lines.append(("Distillation was tried and not kept: " if recovery.get("tried")
                          else "Distillation was not used: ") + f"{recovery.get('why_not')}.")
    return lines


def render_report(m: dict[str, Any]) -> str:
    lines = [f"# slimc report: {m['model']['name']}", ""]
    lines += [
        f"- source: `{m['model']['source']}`",
        f"- target: **{m['target']['name']}** (`{m['target']['tvm']}`)",
        f"- slimc {m['slimc_version']}, torch {m['versions']['torch']}, "
        f"TVM {m['versions']['tvm']}, {m['threads']} runtime thread(s)",
        "",
        "| | before | after |", "|---|---:|---:|",
        f"| parameters | {m['params_before']:,} | {m['params_after']:,} |",
        f"| weight bytes | {_mib(m['weight_bytes_before'])} | {_mib(m['weight_bytes_after'])} |",
        "", "## Pipeline", "",
    ]
    if m["pipeline"]:
        lines += ["| pass | kind | seconds | params after | fidelity |", "|---|---|---:|---:|---|"]
        for p in m["pipeline"]:
            opts = ",".join(f"{k}={v}" for k, v in p["options"].items())
            name = p["pass"] + (f"{{{opts}}}" if opts else "")
            fid = ", ".join(f"{k}={v:.3g}" for k, v in p["fidelity"].items()) or "-"
            lines.append(f"| `{name}` | {p['kind']} | {p['seconds']:.2f} | "
                         f"{p['params_after']:,} | {fid} |")
    else:
        lines.append("No passes (`-O0`): the artifact computes exactly what the model does.")
    lines += _coverage(m["pipeline"])
    lines += _distillation(m["pipeline"])
    lines += _search(m.get("search"))
    v = m["verification"]
    lines += ["", "## Verification", ""]
    if v.get("passed") and v.get("method") == "per-kernel":
        k = v["kernels"]
        lines.append(f"Checked kernel by kernel ({v['method_reason']}): the module the library "
                     "was built from, rebuilt for this CPU, ran the whole model on the example "
                     f"inputs and matched the IR (relative L2 error {v['relative_l2_vs_ir']:.3g}"
                     f", tolerance {v['tolerance']:g}); on {v['ran_on']} the written library "
                     f"ran each of its {k['checked']} distinct kernels ({k['total']} called, "
                     f"{k['calls_in_model']} calls in the model) once on the arguments of its "
                     f"first call and matched the host build (worst relative L2 "
                     f"{k['worst_relative_l2']:.3g}, {k['worst']}). Not covered: "
                     f"{v['not_covered']}.")
    elif v.get("passed"):
        lines.append(f"The library was run on {v['ran_on']} with the example inputs and matched "
                     f"the IR: relative L2 error {v['relative_l2_vs_ir']:.3g} "
                     f"(tolerance {v['tolerance']:g}), max abs error "
                     f"{v['max_abs_error_vs_ir']:.3g}.")
    elif v.get("run_error"):
        lines.append(f"**Not verified**: {v.get('reason')}. The artifact was written without "
                     "being checked; run it on the device (`slimc run`) before trusting it.")
    else:
        lines.append(f"**Not run**: {v.get('reason')}.")
    q = m.get("quality")
    if q:
        from slimc.task_eval import describe

        lines += ["", "## Task quality", "", f"**{describe(q)}**", "",
                  f"- compared: {q['compared']}",
                  f"- data: `{q['data']}`" + (f" ({q['note']})" if q.get("note") else "")
                  + (f"; {q['held_out']}" if q.get("held_out") else ""),
                  f"- examples: {q['examples'] if q['examples'] is not None else 'n/a'}",
                  f"- {'higher' if q['higher_is_better'] else 'lower'} is better; drop "
                  f"{q['drop']:.2%}"]
        extra = {k: v for k, v in q["all"]["original"].items() if k != q["metric"]}
        lines += [f"- {k}: {v:.4g} (original) -> {q['all']['artifact'][k]:.4g} (artifact)"
                  for k, v in extra.items()]
    lines += ["", "## Fidelity against the original model", "",
              "Raw outputs on one example input, original fp32 model vs "
              + ("the built library." if m["fidelity"].get("measured_on") == "artifact"
                 else "the compressed IR.") + " Task quality (above, with `--eval-data`) is "
              "what matters for the job.", "",
              "| metric | value |", "|---|---:|"]
    for k, val in m["fidelity"].items():
        shown = f"{val:.6g}" if isinstance(val, float | int) and not isinstance(val, bool) \
            else str(val)
        lines.append(f"| {k} | {shown} |")
    lines += ["", "## Interface", "", "| | name | shape | dtype |", "|---|---|---|---|"]
    lines += [f"| input | {s['name']} | {s['shape']} | {s['dtype']} |" for s in m["inputs"]]
    lines += [f"| output | {s['name']} | {s['shape']} | {s['dtype']} |" for s in m["outputs"]]
    lines += ["", "## Timings (s)", ""]
    lines += [f"- {k.removesuffix('_s')}: {v}" for k, v in m["timings"].items()]
    lines += ["", f"Library: `{m['library']}` ({m['library_bytes']:,} bytes), sha256 "
              f"`{m['sha256']}`.", "",
              "Run it: `slimc run <this directory>` (example inputs) or "
              "`slimc run <dir> --input NAME=file.npy`; in Python: `slimc.load(dir)(**inputs)`.",
              ""]
    return "\n".join(lines)
