"""The short markdown summary of an eval.json document (eval.md, and what `advmoe eval` prints)."""
from __future__ import annotations

LABELS = {"clean": "clean", "autoattack": "AutoAttack", "apgd": "APGD-CE + APGD-T", "fab": "FAB-T", "route-fixed": "route-fixed",
          "router": "router attack",
          "square": "Square alone"}


def label(name: str) -> str:
    return LABELS.get(name, name.upper() if name.startswith("pgd-") else name)


def summary(doc: dict) -> str:
    where = f"`{doc['checkpoint']}` " if "checkpoint" in doc else ""
    images = "validation images its training held out" if doc.get("split") == "val" else "test images"
    part = doc.get("images")
    which = f"the first {doc['examples']}" if part is None else (
        f"{doc['examples']} ({'drawn with seed ' + str(part['draw_seed']) + ', ' if part['order'] == 'drawn' else ''}"
        f"from number {part['start']})")
    data = f"{which} {doc['dataset']} {images}" if "dataset" in doc else f"{doc['examples']} examples"
    lines = [f"# Robustness of {where.strip() or 'a model'}", "",
             f"{data}, linf eps = {doc['eps']:.4g} ({doc.get('eps_source', 'given')}), "
             f"{'MoE' if doc['moe'] else 'dense'} model; {doc['seconds']:.0f} s on "
             f"{doc['threads']} CPU thread(s)" + (f" and {doc['device']}" if doc.get("device", "cpu") != "cpu" else "") + "."
             + (f" The white-box attacks followed the `{grad}` straight-through gradient of the gate, not the model's own."
                if (grad := doc.get("settings", {}).get("gate_grad")) else ""), "",
             "| attack | accuracy | seconds | examples/s |", "|---|---|---|---|"]
    for name, entry in doc["attacks"].items():
        rate = entry.get("examples_per_second")
        lines.append(f"| {label(name)} | {100 * entry['accuracy']:.1f} % | {entry['seconds']:.1f} | "
                     f"{'' if rate is None else f'{rate:.2f}'} |")
    lines.append(f"| **worst case per example** | **{100 * doc['robust_accuracy']:.1f} %** | | |")
    lines.append("")
    for name, why in doc["skipped"].items():
        lines.append(f"- {label(name)} skipped: {why}.")
    router = doc["attacks"].get("router")
    if router:
        given = router["prediction_flip_given_route_flip"]
        lines.append(f"- Router attack: the route flips for {100 * router['route_flip_rate']:.1f} % of the examples; "
                     f"the prediction flips with it for "
                     f"{'n/a' if given is None else f'{100 * given:.1f} %'} of those.")
    fixed = doc["attacks"].get("route-fixed")
    if fixed:
        per = "; ".join(f"expert {r['expert']}: forced clean {100 * r['forced_clean_accuracy']:.1f} %, "
                        f"forced under attack {100 * r['forced_adversarial_accuracy']:.1f} %, real model "
                        f"{100 * r['real_accuracy']:.1f} %" for r in fixed["routes"])
        lines.append(f"- Route-fixed: {per}.")
    experts = doc.get("experts")
    if experts:
        shares = ", ".join(f"{100 * s:.0f} %" for s in experts["clean_share"])
        lines.append(f"- Expert usage on clean inputs: {shares}; " + "; ".join(
            f"{label(k)}: {', '.join(f'{100 * s:.0f} %' for s in v)}" for k, v in experts["adversarial_share"].items()) + ".")
        lines.append("- Accuracy per route (clean route): " + "; ".join(
            f"{k}: {v['examples']} examples, clean {100 * v['clean_accuracy']:.1f} %, robust {100 * v['robust_accuracy']:.1f} %"
            for k, v in experts["per_route"].items()) + ".")
    sanity = doc["sanity"]
    lines += ["", "## Sanity checks", ""]
    for check in sanity["checks"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[check["passed"]]
        lines.append(f"- {mark}: {check['name']} ({check['detail']})")
    lines.append("")
    if sanity["possible_gradient_masking"]:
        lines.append("**possible gradient masking**: a check above failed; do not trust attacks that rely on "
                     "gradients alone for this model.")
    elif sanity["passed"]:
        lines.append("All sanity checks passed.")
    else:
        lines.append(f"Failed: {', '.join(sanity['failed'])}.")
    for flag in doc.get("autoattack_flags", []):
        lines.append(f"- AutoAttack's own check: {flag}")
    return "\n".join(lines) + "\n"
