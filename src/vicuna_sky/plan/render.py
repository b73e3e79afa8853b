"""The plan for a terminal: a few lines of where the figures come from, the GPU types, the
offers ranked, and the lines a reader must not miss (egress, enabled clouds, SkyPilot's own
choice, the seed, the budget)."""

from __future__ import annotations

import math

from vicuna_sky.plan.result import SKYPILOT_RULE, Plan


def _hm(seconds: float) -> str:
    if seconds == math.inf:
        return "never"
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def _usd(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _where(o: object) -> str:
    return f"{o.cloud} {o.region} {o.price.instance_type} ({o.option.gpu})"


def render(plan: Plan) -> list[object]:
    """Rich renderables, in reading order."""
    from rich.table import Table
    from rich.text import Text

    tc, best = plan.token_count, plan.best
    lines: list[object] = [
        Text(
            f"{plan.recipe}: {plan.nodes} x {plan.gpus_per_node} GPUs, "
            f"{plan.tokens / 1e6:,.0f}M tokens; prices from {plan.catalog}"
        ),
        Text(f"tokens {tc.basis}", style="dim"),
        Text(f"egress: {plan.egress['note']}", style="dim"),
    ]
    gpus = Table(title="GPU types", title_justify="left")
    for col in ("gpu", "memory per GPU", "tokens/s per GPU", "throughput from"):
        gpus.add_column(col)
    for o in plan.options:
        mem = o.memory
        fit = "memory unknown" if mem is None else f"{mem.need_gb:,.1f} of {mem.usable_gb:,.1f} GB"
        tp = o.throughput
        gpus.add_row(
            f"{o.gpu}:{o.count}",
            f"{fit}: {o.status}",
            "-" if tp is None else f"{tp.per_gpu:,.0f}",
            "-" if tp is None else tp.basis,
            style=None if o.status == "fits" else "red",
        )
    lines.append(gpus)
    if best:
        ck, run = best.checkpointing, best.run
        lines.append(
            Text(
                f"checkpoint {ck.size_bytes / 1e9:,.1f} GB: training waits "
                f"{ck.stall_seconds:,.0f} s, committed {ck.commit_seconds:,.0f} s later; every "
                f"{best.every_steps} steps ({_hm(run.interval_seconds)}, Young/Daly at "
                f"{best.preemptions_per_hour:g} preemptions/h; the recipe's "
                f"{plan.recipe_every_steps}); a relaunch {run.relaunch_seconds / 60:,.1f} min",
                style="dim",
            )
        )
        for cloud, e in plan.emergency().items():
            verdict = "fits" if e["fits"] else "does NOT fit"
            lines.append(
                Text(
                    f"emergency checkpoint on {cloud}: needs ~{e['needs_seconds']:,.0f} s, the "
                    f"notice gives {e['window_seconds']:.0f} s -> {verdict}: {e['then']}",
                    style="green" if e["fits"] else "yellow",
                )
            )
    table = Table(title="offers, ranked (enabled clouds first)", title_justify="left")
    cols = ("cloud", "region", "instance", "spot $/h (zones, range)", "flagged", "preempt/h")
    cols += ("hours", "spot $", "on-demand $", "egress $", "take", "$/M tokens")
    for col in cols:
        table.add_column(col, justify="right" if "$" in col or col == "hours" else "left")
    # spot $ and on-demand $ include the egress $ (0 on the bucket's cloud)
    for o in plan.offers[: plan.top]:
        p = o.price
        spot = (
            "-"
            if p.spot is None
            else f"{p.spot:,.2f} ({p.zones}, {p.spot_low:,.2f}-{p.spot_high:,.2f})"
        )
        flagged = [f"{z} {price:,.2f} outlier" for z, price in p.outliers]
        flagged += [f"{z} {kind}" for z, kind, _ in p.left_out]
        table.add_row(
            o.cloud + ("" if o.enabled else " (not enabled)"),
            o.region,
            f"{p.instance_type} ({o.option.gpu})",
            spot,
            "; ".join(flagged) or "",
            f"{o.preemptions_per_hour:g}",
            f"{o.work_seconds / 3600:,.1f}",
            _usd(o.spot_usd),
            _usd(o.on_demand_usd),
            _usd(o.spot_egress_usd if o.recommended == "spot" else o.on_demand_egress_usd),
            o.recommended,
            f"{o.usd / (plan.tokens / 1e6):,.3f}",
        )
    if not plan.offers:
        table.add_row("-", "no GPU type that fits has an offer", *[""] * (len(cols) - 2))
    lines.append(table)
    for o in plan.offers[: plan.top]:
        if o.why:
            lines.append(Text(f"{_where(o)}: {o.why}", style="yellow"))
    if not plan.enabled_clouds:
        lines.append(
            Text(
                "no cloud is enabled: run `sky check` (the offers are shown all the same)",
                style="yellow",
            )
        )
    if best:
        lines.append(
            Text(
                f"best: {_where(best)} on {best.recommended}, ~${best.usd:,.0f}; the launch "
                f"offers SkyPilot {', '.join(plan.launch_set)}"
            )
        )
        sky = plan.skypilot_choice
        if sky is not None and sky is not best:
            lines.append(
                Text(
                    f"SkyPilot's own choice differs: {_where(sky)} at "
                    f"${plan.skypilot_price:,.2f}/h ({SKYPILOT_RULE}); at this plan's model "
                    f"that run costs ~${sky.usd:,.0f}",
                    style="yellow",
                )
            )
    seed = plan.seed
    if seed.get("usd") is not None:
        at = seed["at_seed_settings"] if seed["at_seed_settings"]["gpu"] else None
        packed = seed["packed_same_gpu"] if seed["packed_same_gpu"]["gpu"] else None
        text = f"seed figure: ~${seed['usd']:,.0f} ({seed['source']})"
        if at:
            text += (
                f"; this recipe at the seed's settings ({at['gpu']}, unpacked rows, "
                f"{at['tokens_per_gpu_second']:,.0f} tokens/s per GPU): spot "
                f"${_usd(at['spot_usd'])}, on demand ${_usd(at['on_demand_usd'])}"
            )
        if packed:
            text += f"; packed on {packed['gpu']}: spot ${_usd(packed['spot_usd'])}"
        if best:
            text += f"; best here: ${best.usd:,.0f}"
        lines.append(Text(text))
    usd = plan.expected_usd
    if plan.budget_usd and usd is not None:
        verdict = "OVER BUDGET" if plan.over_budget else "within budget"
        lines.append(
            Text(
                f"budget ${plan.budget_usd:,.0f}: best {best.recommended} ${usd:,.0f} -> {verdict}",
                style="bold red" if plan.over_budget else "green",
            )
        )
    return lines
