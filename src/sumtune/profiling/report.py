"""Plain-text reports: the profile summary and the MobileNet study table."""

from __future__ import annotations

from typing import Any

from sumtune.profiling.profiler import PHASES


def _fmt(value: Any, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_summary(summary: dict[str, Any]) -> str:
    """The printed profile report: what the step costs, where the time goes, and what to change."""
    out = [f"profile on {summary.get('device')} ({summary.get('device_name') or 'unknown device'}), "
           f"{summary.get('steps_recorded', 0)} measured steps after "
           f"{summary['schedule']['wait']} wait + {summary['schedule']['warmup']} warmup"]
    if summary.get("error"):
        return "\n".join(out + [f"error: {summary['error']}"])
    ms = lambda s: _fmt(None if s is None else 1e3 * s, ".1f", " ms")
    out.append(f"step time     mean {ms(summary['step_time_mean_s'])}, median {ms(summary['step_time_median_s'])}, "
               f"min {ms(summary['step_time_min_s'])}, max {ms(summary['step_time_max_s'])}")
    out.append(f"throughput    {_fmt(summary.get('samples_per_s'))} samples/s, {_fmt(summary.get('tokens_per_s'), '.0f')} tokens/s, "
               f"MFU {_fmt(summary.get('mfu_pct'), '.1f', '%')}"
               + (f" ({summary['mfu_measured_pct']:.1f}% of the bf16 matmul rate measured, "
                  f"{summary['matmul_tflops']:.0f} TFLOP/s)" if summary.get("mfu_measured_pct") else "")
               + (f" ({summary['mfu_flops_counted'].split(':')[0]})" if summary.get("mfu_flops_counted") else ""))
    gib = summary.get("mem_kind") == "cuda_allocated" and "GPU allocated" or "process RSS"
    out.append(f"memory        {gib}: peak {_fmt(summary.get('peak_mem_gib'), '.2f', ' GiB')}, "
               f"mean {_fmt(summary.get('mean_mem_gib'), '.2f', ' GiB')} of {_fmt(summary.get('device_mem_total_gib'), '.0f', ' GiB')}"
               + (f" (incl. {summary['graph_pool_gib']:.2f} GiB held by CUDA graphs)" if summary.get("graph_pool_gib") else ""))
    gpu = summary.get("gpu")
    if gpu:
        out.append(f"GPU           busy {_fmt(gpu.get('utilization_pct'), '.0f', '%')} of the step (trace), "
                   f"NVML {_fmt(gpu.get('nvml_utilization_pct'), '.0f', '%')}, "
                   f"est. SM efficiency {_fmt(gpu.get('est_sm_efficiency_pct'), '.0f', '%')}, "
                   f"tensor-core kernels {_fmt(gpu.get('tensor_core_pct'), '.0f', '%')} of kernel time")
        if gpu.get("kernel_families_pct"):
            out.append("kernels       " + ", ".join(f"{family} {pct:.0f}%" for family, pct
                                                    in gpu["kernel_families_pct"].items()) + " of kernel time")
    host = summary.get("host")
    if host:
        out.append(f"host          {_fmt(host.get('syncs_per_step'), '.0f')} device syncs/step "
                   f"(waiting {_fmt(host.get('sync_wait_pct'), '.0f', '%')} of the step), "
                   f"{_fmt(host.get('launches_per_step'), ',.0f')} kernel launches/step "
                   f"({_fmt(host.get('launch_host_pct'), '.0f', '%')} of the step), "
                   f"GPU idle {_fmt(None if not gpu or gpu.get('utilization_pct') is None else 100 - gpu['utilization_pct'], '.0f', '%')}")
        for site in host.get("sync_sites") or []:
            out.append(f"                {site['per_step']:.0f} syncs/step in {_short(site['site'], 90)}")
    out.append("")
    out.append("step breakdown")
    parts, pct = summary["breakdown_s"], summary["breakdown_pct"]
    names = [n for n in (*PHASES, *sorted(set(parts) - set(PHASES) - {"other"}), "other") if n in parts]
    out += ["  " + r for r in _table(["phase", "ms", "%"], [[n, f"{1e3 * parts[n]:.2f}", f"{pct[n]:.1f}"] for n in names])]
    if summary.get("top_kernels"):
        out += ["", "top GPU kernels"]
        rows = [[_short(k["name"]), str(k["calls"]), f"{k['total_ms']:.2f}", f"{k['pct']:.1f}", "yes" if k["tensor_core"] else ""]
                for k in summary["top_kernels"]]
        out += ["  " + r for r in _table(["kernel", "calls", "total ms", "% kernels", "tensor core"], rows)]
    if summary.get("top_ops"):
        out += ["", "top operators (self CPU time)"]
        rows = [[_short(o["name"]), str(o["calls"]), f"{o['self_cpu_ms']:.2f}", f"{o['pct']:.1f}"] for o in summary["top_ops"]]
        out += ["  " + r for r in _table(["op", "calls", "self CPU ms", "%"], rows)]
    out += ["", "advice"] + [f"  - {a}" for a in summary.get("advice") or ["no obvious bottleneck in these numbers."]]
    if summary.get("trace_file"):
        out += ["", f"trace: {summary['trace_file']} (tensorboard --logdir <run dir>, PyTorch Profiler tab)"]
    return "\n".join(out)


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def format_study_table(result: dict[str, Any]) -> str:
    """Our stages next to the published Quadro RTX 4000 numbers."""
    mem = "GPU GB" if result.get("device") == "cuda" else "RSS GB"
    headers = ["stage", "batch", mem, "step ms", "samples/s", "vs base", "| published:", "GB", "step ms", "samples/s", "vs base"]
    rows = []
    for row in result["stages"]:
        pub = row.get("published") or {}
        rows.append([
            row["stage"], str(row["batch_size"]), _fmt(row.get("mem_gb"), ".2f"), _fmt(row.get("step_ms")),
            _fmt(row.get("samples_per_s")), _fmt(row.get("vs_base_pct"), ".0f", "%"), "|",
            _fmt(pub.get("gpu_gb"), ".2f"), _fmt(pub.get("step_ms")), _fmt(pub.get("samples_per_s")),
            _fmt(pub.get("vs_base_pct"), ".0f", "%"),
        ])
    title = (f"MobileNetV2 / CIFAR10-shaped images at {result.get('image_size')}px on "
             f"{result.get('device_name') or result.get('device')} (published: Quadro RTX 4000)")
    return "\n".join([title, *_table(headers, rows)])
