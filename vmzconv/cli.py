"""``vmzconv``: a thin click shell over the library; each command is one library call."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .arch import ARCH_NAMES, FAMILIES
from .errors import CheckError, VmzconvError
from .parity import DEFAULT_TOLERANCE, parse_clip
from .run import PRECISIONS, RUNTIMES
from .targets import DEFAULT_TARGET, TARGETS, TARGET_NAMES
from .text import render_table, safe

_FAMILY_LIST = ", ".join(f.title for f in FAMILIES.values())
_TARGET_HELP = "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values())
_DEFAULT_TARGETS = ", ".join(f"{FAMILIES[f].title} -> {t}" for f, t in DEFAULT_TARGET.items())


def _interrupted(e: BaseException) -> bool:
    """Ctrl-C, also when a library turned it into another error on the way out (torch.save's zip
    writer raises RuntimeError while a KeyboardInterrupt unwinds it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _fail_cleanly(fn):
    """User errors become one line on stderr and an exit code; Ctrl-C (and SIGTERM) leave no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VmzconvError as e:
            click.echo(f"vmzconv: error: {safe(e)}", err=True)
            sys.exit(e.exit_code)
        except BaseException as e:
            if not _interrupted(e):
                raise
            _report_interrupt()
            sys.exit(130)

    return wrapper


_WRITTEN: list[str] = []     # outputs a command has finished writing (complete files) in this process


def _written(*paths) -> None:
    """Record that ``paths`` are complete on disk: an interrupt from here on says so."""
    _WRITTEN.extend(str(p) for p in paths if p)


def _report_interrupt() -> None:
    if _WRITTEN:
        click.echo(f"vmzconv: interrupted after writing {safe(', '.join(_WRITTEN))} (complete); the rest of the "
                   "command did not run", err=True)
    else:
        click.echo("vmzconv: interrupted; no partial output was left", err=True)


class _Group(click.Group):
    """click, with usage errors on one line like every other error, and SIGTERM handled like Ctrl-C."""

    def main(self, args=None, prog_name=None, **kwargs):
        import signal
        import threading

        kwargs.pop("standalone_mode", None)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        _WRITTEN.clear()
        try:
            result = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.UsageError as e:
            where = e.ctx.command_path if e.ctx else "vmzconv"
            click.echo(f"vmzconv: error: {e.format_message()} (see '{where} --help')", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            _report_interrupt()
            sys.exit(130)
        # The command is done and said so: an interrupt that lands while the process exits would only turn
        # a finished run into exit 130 with no word (or a traceback); from here on it is ignored. (Only for
        # the process's own command line, args=None: a caller that passes args keeps its handlers.)
        if args is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return result


class _Stages:
    """A small progress bar over the pipeline's stages (stderr, only on a terminal)."""

    def __init__(self, quiet: bool, stages=("read", "map", "parity", "write")):
        from tqdm import tqdm

        self.bar = tqdm(total=len(stages), desc="convert", unit="step", leave=False,
                        disable=quiet or not sys.stderr.isatty(), file=sys.stderr)
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(name)

    def close(self) -> None:
        self.bar.close()


def _print_result(res, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({
            "output": res.output, "sha256": res.sha256, "arch": res.arch, "num_classes": res.num_classes,
            "target": res.target, "tensors": res.tensors, "blobs_converted": res.blobs_converted,
            "ignored": res.ignored, "dropped": res.dropped, "notes": res.notes,
            "parity": res.verdict.to_meta(timings=True) if res.verdict else None, "seconds": res.seconds,
            "card": res.card,
        }, indent=2))
        return
    rows = [
        ("output", res.output),
        ("arch", f"{res.arch} ({res.num_classes} classes)"),
        ("target", res.target),
        ("tensors", f"{res.tensors} written from {res.blobs_converted} blobs"),
        ("ignored", ", ".join(f"{k} ({v})" for k, v in res.ignored.items()) or "none"),
    ]
    if res.dropped:
        rows.append(("dropped", ", ".join(res.dropped)))
    rows += [("note", n) for n in res.notes]
    rows.append(("parity", res.verdict.summary() if res.verdict else "skipped (--no-parity)"))
    if res.meta.get("zoo"):
        z = res.meta["zoo"]
        acc = ", ".join(f"{k} {v}" for k, v in z["published_accuracy"].items()) or "none published (pretraining only)"
        rows.append(("zoo", f"{z['file']} -> {z['name']} ({z['kind']}; {acc})"))
    if res.card:
        rows.append(("card", res.card))
    rows += [("sha256", res.sha256), ("seconds", f"{res.seconds:.1f}")]
    for k, v in rows:
        click.echo(f"{k:<8} {safe(v)}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmzconv")
def main():
    """Convert VMZ (Caffe2) .pkl checkpoints (ir-CSN, ip-CSN, R(2+1)D, R3D, the 2018 R2D, fR2D,
    MCx, rMCx and C3D, optical-flow and audio-visual models) into PyTorch checkpoints that load
    strictly into MMAction2, torchvision-style or plain PyTorch models, and prove each one numerically.

    Start with `vmzconv demo` (no downloads), then `vmzconv inspect FILE.pkl`
    and `vmzconv convert FILE.pkl OUT.pth`.

    Exit status of every command: 0 success, 1 a check ran and failed (parity, accuracy, the ONNX
    proof), 2 bad input, 130 interrupted (Ctrl-C or SIGTERM). Errors are one line on stderr.
    """


_max_bytes_option = click.option(
    "--max-bytes", type=click.IntRange(min=1), metavar="N",
    help="Refuse a file whose arrays would need more than N bytes of memory (default: 4 x the file size).")
_parity_clip_option = click.option(
    "--parity-clip", metavar="T,H",
    help="Frames and side of the fixed parity clip (1 x 3 x T x H x H); default: the family's "
         "(8,224 for CSN, 8,112 for R(2+1)D, R3D and the 2018 ResNets, 16,112 and nothing else for C3D).")
_tolerance_option = click.option(
    "--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True,
    help="Largest allowed absolute logit difference.")


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(("auto",) + ARCH_NAMES), default="auto", show_default=True,
              help="Expected architecture; a named one that disagrees with the blobs is an error.")
@click.option("--target", type=click.Choice(("auto",) + TARGET_NAMES), default="auto", show_default=True,
              help=f"Output layout. {_TARGET_HELP}. auto: {_DEFAULT_TARGETS}.")
@click.option("--keep-head", is_flag=True,
              help="Keep the classifier of a 359/487-class (IG-65M/Sports-1M pretraining) pickle; by default "
                   "those become an mmaction2-backbone file with --target mmaction2 (torchvision and "
                   "pytorchvideo files always keep the head).")
@click.option("--publish", metavar="NAME",
              help="Write OUT/NAME_YYYYMMDD-<sha256[:8]>.pth (MMAction2 publish_model naming); OUT is then a folder.")
@click.option("--date", metavar="YYYYMMDD", help="Date in the --publish name (default: today).")
@click.option("--card/--no-card", default=True, show_default=True,
              help="Write a model card OUT.json (the checkpoint's meta: source, arch, parity, preprocessing, "
                   "published accuracy of known zoo files).")
@click.option("--print-config", is_flag=True,
              help="Print what loads the result: a complete MMAction2 config, or the torchvision / pytorchvideo / "
                   "plain PyTorch (C3D) lines that build the matching model.")
@click.option("--check-consumer", is_flag=True,
              help="Also build the model in torchvision / pytorchvideo itself, or C3D from the card's class (the "
                   "card's recipe; the library must be importable) and require parity from it before writing.")
@click.option("--mapping", "mapping_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Use this mapping table (TOML) instead of the built-in one.")
@click.option("--parity/--no-parity", "check_parity", default=True, show_default=True,
              help="Compare logits with the NumPy Caffe2 reference before writing.")
@click.option("--tower", type=click.Choice(["all", "visual"]), default="all", show_default=True,
              help="Audio-visual files: visual writes the visual tower alone as an ordinary file of its family in "
                   "--target's layout (ip-CSN: an MMAction2 ResNet3dCSN backbone), its classifier the G-Blend "
                   "visual head; without G-Blend heads, a backbone (mmaction2-backbone) only.")
@_parity_clip_option
@_tolerance_option
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--allow-non-finite", is_flag=True, help="Write weights that hold NaN or Inf (refused by default).")
@_max_bytes_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def convert(src, out, arch, target, keep_head, publish, date, card, print_config, check_consumer, mapping_path,
            check_parity, tower, parity_clip, tolerance, force, allow_non_finite, max_bytes, as_json, quiet):
    """Convert SRC (a VMZ .pkl) to OUT (.pth or .safetensors, by suffix).

    Reads SRC without executing it, maps every blob through a declarative table,
    loads the result strictly into the reference model, checks parity against the
    Caffe2-semantics reference, and only then writes OUT atomically. Exit status:
    0 written, 1 parity failed, 2 bad input, 130 interrupted (Ctrl-C or SIGTERM; nothing half-written).
    """
    from .convert import convert as convert_file

    stages = _Stages(quiet or as_json)
    try:
        res = convert_file(src, out, arch=arch, target=target, mapping_path=mapping_path, check_parity=check_parity,
                           parity_clip=parse_clip(parity_clip), tolerance=tolerance, force=force,
                           keep_head=keep_head, card=card, publish=publish, date=date, max_bytes=max_bytes,
                           progress=stages, consumer=check_consumer, allow_non_finite=allow_non_finite,
                           tower=tower)
    finally:
        stages.close()
    _written(res.output, res.card)
    _print_result(res, as_json)
    if print_config and not as_json:
        from .configs import test_config

        click.echo()
        click.echo(test_config(res.output))


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@_max_bytes_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_fail_cleanly
def inspect(src, max_bytes, as_json):
    """Show what SRC (a VMZ .pkl) holds: architecture, classes, blob and parameter
    counts, training leftovers and anything suspicious — without converting."""
    from .convert import inspect as inspect_file

    report = inspect_file(src, max_bytes)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"file       {safe(report['file'])} ({report['bytes']} bytes, sha256 {report['sha256'][:16]}...)")
    click.echo(f"blobs      {report['blobs']} ({', '.join(report['dtypes'])})")
    click.echo(f"arch       {report['arch']} ({report['num_classes']} classes, conv1 temporal kernel "
               f"{report['conv1_temporal_kernel']}; {report['modality']})")
    click.echo(f"parameters {report['parameters']:,} in {report['parameter_blobs']} parameter blobs")
    if "towers" in report:
        t = report["towers"]
        click.echo(f"visual     {t['visual']}\naudio      {t['audio']}\nfusion     {t['fusion']}")
        click.echo(f"heads      {', '.join(t['heads'])}" + (" (G-Blend)" if len(t["heads"]) > 1 else ""))
    left = report["non_parameter_blobs"]
    click.echo(f"leftovers  {len(left)}" + (": " + safe(", ".join(f"{k} ({v})" for k, v in list(left.items())[:6]))
                                            if left else ""))
    for note in report["notes"]:
        click.echo(f"note       {safe(note)}")
    sus = {k: v for k, v in report["suspicious"].items() if v}
    if not sus:
        click.echo("suspicious nothing")
    for kind, items in sus.items():
        shown = items if isinstance(items, list) else [f"{k}: {v}" for k, v in items.items()]
        click.echo(f"suspicious {kind}: {safe(', '.join(shown[:6]))}{' ...' if len(shown) > 6 else ''}")


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("converted", type=click.Path(dir_okay=False, path_type=Path))
@_parity_clip_option
@_tolerance_option
@click.option("--trace", is_flag=True,
              help="Compare the output of the stem, of every residual block (C3D: of each pool; audio-visual: the "
                   "visual tower's, then the audio tower and every head) and of the head, and name the first stage "
                   "that diverges (with what usually causes it there).")
@click.option("--trace-tolerance", type=float, default=1e-4, show_default=True,
              help="Largest relative difference (max |diff| / max |reference|) a traced stage may have.")
@click.option("--bn-eps", type=float, help="Build the PyTorch side with this BN eps (e.g. 1e-5, pytorchvideo's) "
              "to see where a consumer's choice starts to matter.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict (or trace) as JSON on stdout.")
@_fail_cleanly
def parity(src, converted, parity_clip, tolerance, trace, trace_tolerance, bn_eps, as_json):
    """Check CONVERTED (a .pth or .safetensors: ours, MMAction2's, a torchvision-layout or bare state
    dict of a VMZ model) against SRC, the .pkl it came from.

    Exit status 0 when the logits agree within the tolerance with identical top-5 (and, with --trace,
    no stage diverges), 1 otherwise, 2 bad input, 130 interrupted.
    """
    from . import parity as parity_mod
    from .convert import parity_of

    a, target, result = parity_of(src, converted, parse_clip(parity_clip), tolerance, trace=trace,
                                  trace_tolerance=trace_tolerance, bn_eps=bn_eps)
    if trace:
        if as_json:
            click.echo(json.dumps({"arch": a.name, "target": target, **result.to_json()}, indent=2))
        else:
            click.echo(f"{safe(converted)} ({a.name}, {target}) vs {safe(src)}: stage outputs on the fixed clip")
            rows = [["stage", "max |diff|", "rel diff", ""]]
            for st in result.stages:
                mark = "<- first divergent" if st.name == result.first_divergent else ("diverges" if st.divergent else "")
                rows.append([st.name, f"{st.max_abs_diff:.3g}", f"{st.rel_diff:.3g}", (mark + " " + st.note).strip()])
            click.echo(render_table(rows, right=(1, 2)))
            if result.first_divergent:
                click.echo(f"first divergent: {result.first_divergent} (relative diff > {trace_tolerance:g}); "
                           f"usually {result.hint}")
            click.echo(f"parity   {result.verdict.summary()}")
        if not result.passed:
            where = f"first divergent stage {result.first_divergent}" if result.first_divergent else result.verdict.reason
            raise CheckError(f"{converted}: does not compute what Caffe2 computes — {where}")
        return
    if as_json:
        click.echo(json.dumps({"arch": a.name, "target": target, **result.to_meta(timings=True)}, indent=2))
    else:
        click.echo(f"{safe(converted)} ({a.name}, {target}) vs {safe(src)}")
        click.echo(f"parity   {result.summary()}")
    parity_mod.require(result, str(converted))


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--test", "mode", flag_value="test", default=True,
              help="The published test protocol (default): MMAction2 1.x config for an MMAction2 file, the lines "
                   "that build and load the model for the other layouts.")
@click.option("--finetune", "mode", flag_value="finetune",
              help="A training config: the converted backbone (an mmaction2-backbone file; BN frozen, eps 1e-3) "
                   "with a new --num-classes head and MMAction2's recipe for VMZ-pretrained CSNs; for layouts "
                   "MMAction2 cannot hold (R(2+1)D), runnable plain-PyTorch lines instead.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Classes of the new head (--finetune).")
@click.option("--ann-train", help="Training list ('path label' per line) to put in the config.")
@click.option("--ann-val", help="Validation list to put in the config.")
@click.option("--data-root", help="Folder the lists' paths are under.")
@_fail_cleanly
def config(ckpt, mode, num_classes, ann_train, ann_val, data_root):
    """Print, on stdout only, what to use CKPT (a file vmzconv converted) with next: a complete MMAction2 1.x
    config (--test, the default; or --finetune --num-classes K), or Python lines for the other layouts.
    Every MMAction2 config it prints is built and initialised by MMAction2 itself in the tests."""
    from .configs import finetune_config, test_config

    if mode == "finetune":
        if num_classes is None:
            raise VmzconvError("--finetune needs --num-classes K (the classes of your dataset)")
        click.echo(finetune_config(ckpt, num_classes, ann_train, ann_val, data_root))
    else:
        if num_classes or ann_train or ann_val or data_root:
            raise VmzconvError("--num-classes, --ann-train, --ann-val and --data-root go with --finetune")
        click.echo(test_config(ckpt))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the zoo as JSON.")
def zoo(as_json):
    """List the known VMZ pickles (ir/ip-CSN, R(2+1)D, R3D, the 2018 R2D, fR2D, MCx, rMCx, C3D, the
    optical-flow and the audio-visual models): arch, classes, modality, pretraining, what file each becomes, the normalisation its MMAction2 config uses, and the
    published accuracy (VMZ's video@1/@5; MMAction2's re-measurements where they exist)."""
    from .zoo import entries

    rows = [dict(e) for e in entries()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    head = ["file", "arch", "classes", "modality", "pretrain", "kind", "output name", "norm", "VMZ top1/5",
            "MMAction2 top1/5"]

    def acc(e, who):
        return f"{e[who + '_top1']}/{e[who + '_top5']}" if who + "_top1" in e else "-"

    table = [head] + [[e["file"], e["arch"], str(e.get("classes", "?")), e.get("modality", "RGB").split(" (")[0][:24],
                       e["pretrain"].split(" (")[0], e["kind"],
                       e["name"], e.get("norm", "-"), acc(e, "vmz"), acc(e, "mmaction2")] for e in rows]
    click.echo(render_table(table))


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="Worker processes (default: number of cores).")
@click.option("--target", type=click.Choice(TARGET_NAMES),
              help="Layout for every file (default: zoo files as `vmzconv zoo` lists them — CSNs mmaction2, or "
                   "mmaction2-backbone for pretraining files, R(2+1)D torchvision; others by family: "
                   + _DEFAULT_TARGETS + ").")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML with [[file]] path=..., and optional arch=, target=, name= per file.")
@click.option("--force", is_flag=True, help="Reconvert files whose outputs are up to date.")
@_parity_clip_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def bulk(src, out_dir, jobs, target, manifest, force, parity_clip, quiet):
    """Convert every .pkl under SRC (a folder, or a manifest .toml) into OUT_DIR.

    Known VMZ zoo files get their MMAction2 name and kind (recognizer or backbone);
    others are named after the file. Each conversion runs with parity; one failure
    never stops the others. Outputs whose recorded source sha256, options and tool
    version match are skipped, so an interrupted run simply resumes. Writes
    OUT_DIR/report.json and OUT_DIR/report.md; exit 0 only if every file is converted
    (or up to date) and passed parity.
    """
    from tqdm import tqdm

    from . import bulk as bulk_mod

    job_list = bulk_mod.plan(src, out_dir, target=target, manifest=manifest, parity_clip=parse_clip(parity_clip))
    if not job_list:
        raise VmzconvError(f"{src}: no .pkl files found")
    bar = tqdm(total=len(job_list), unit="file", desc="bulk", disable=quiet or not sys.stderr.isatty(),
               file=sys.stderr)

    def progress(row):
        bar.update(1)
        bar.set_postfix_str(safe(f"{Path(row.file).name}: {row.status}"))

    def on_wait():
        click.echo(f"vmzconv: waiting for another bulk run on {out_dir} to finish", err=True)

    try:
        rows = bulk_mod.run(job_list, out_dir, n_jobs=jobs, force=force, progress=progress, on_wait=on_wait)
    finally:
        bar.close()
    click.echo(bulk_mod.render_text(rows, out_dir))
    converted = sum(r.status == "converted" for r in rows)
    fresh = sum(r.status == "up-to-date" for r in rows)
    failed = [r for r in rows if not r.ok]
    if converted == 0 and not failed:
        click.echo(f"nothing to do: all {fresh} outputs are up to date (--force reconverts)")
    else:
        click.echo(f"{converted} converted, {fresh} up to date, {len(failed)} failed; "
                   f"reports: {out_dir / 'report.json'}, {out_dir / 'report.md'}")
    if failed:
        sys.exit(1)


def _floats3(text):
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3:
        raise click.BadParameter("three comma-separated numbers (R,G,B on 0-255)")
    return vals


def _resize(text):
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter("WxH, e.g. 171x128") from None
    return [w, h]


_PROTOCOL_OPTIONS = (
    click.option("--protocol", "protocol_name", type=click.Choice(["mmaction2", "vmz"]),
                 help="Clip offsets and crop order of MMAction2 1.x, or of VMZ's Caffe2 test tools."),
    click.option("--clip-len", type=click.IntRange(min=1), help="Frames per clip."),
    click.option("--frame-interval", type=click.IntRange(min=1), help="Take every N-th frame."),
    click.option("--num-clips", type=click.IntRange(min=1), help="Clips per video, spread over its length."),
    click.option("--short-side", type=click.IntRange(min=1), help="Resize the short side to this (aspect kept)."),
    click.option("--resize", callback=lambda c, p, v: _resize(v), metavar="WxH",
                 help="Resize to exactly WxH instead (VMZ's R(2+1)D/R3D scripts: 171x128)."),
    click.option("--crop-size", type=click.IntRange(min=1), help="Side of the square crops."),
    click.option("--num-crops", type=click.Choice(["1", "3"]), help="1 (centre) or 3 (along the long side)."),
    click.option("--norm", type=click.Choice(["vmz", "imagenet"]),
                 help="Mean/std preset (default: the checkpoint's, i.e. VMZ's); imagenet = MMAction2's IG-65M configs."),
    click.option("--mean", callback=lambda c, p, v: _floats3(v), help="R,G,B mean on 0-255 (overrides --norm)."),
    click.option("--std", callback=lambda c, p, v: _floats3(v), help="R,G,B std on 0-255 (overrides --norm)."),
)
_RUNTIME_OPTIONS = (
    click.option("--runtime", type=click.Choice(RUNTIMES), default="auto",
                 show_default=True, envvar="VMZCONV_RUNTIME", show_envvar=True,
                 help="What runs the model. auto: on the CPU the fastest installed of openvino, onnxruntime, torch "
                      "(in that order, as benchmarks/runtime.py measured); on CUDA torch. ONNX runtimes run the "
                      "model's ONNX graph (dynamic sizes), exported on first use, cached (--graph-cache) and proven "
                      "against PyTorch; one that fails falls back to torch with a note."),
    click.option("--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
    click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                 help="fp16/bf16: CUDA autocast (with BN folded); bf16 on the CPU with --runtime openvino."),
    click.option("--workers", type=click.IntRange(min=0), help="Decoding worker processes (default: min(4, cores-1))."),
    click.option("--threads", type=click.IntRange(min=1),
                 help="CPU threads per process (default: $OMP_NUM_THREADS if set, else cores / processes). Results are "
                      "reproducible for a fixed value."),
    click.option("--graph-cache", type=click.Path(file_okay=False),
                 help="Folder for the ONNX runtimes' graphs (default: $VMZCONV_CACHE, else ~/.cache/vmzconv)."),
    click.option("--silent-audio", is_flag=True,
                 help="Audio-visual models: give a video without an audio stream zero log-mels (marked as such in "
                      "the output) instead of refusing it."),
)
_PROTOCOL_KEYS = ("clip_len", "frame_interval", "num_clips", "short_side", "resize", "crop_size", "num_crops")


def _protocol_options(fn):
    """The test-protocol options shared by verify, predict and features. Every default is the
    protocol recorded in the checkpoint's card (its family's: MMAction2's CSN test, 32 frames x 2,
    10 clips x 3 crops of 256 at short side 256; VMZ's R(2+1)D/R3D test, 8 frames, 10 clips x 1
    crop of 112 from 171x128 frames)."""
    for option in reversed(_PROTOCOL_OPTIONS):
        fn = option(fn)
    return fn


def _protocol_overrides(kw: dict) -> dict:
    """Pop the protocol options from ``kw``: {field: value} for the ones given."""
    over = {k: kw.pop(k) for k in _PROTOCOL_KEYS}
    over["name"] = kw.pop("protocol_name")
    if over["num_crops"] is not None:
        over["num_crops"] = int(over["num_crops"])
    return over


def _runtime_options(fn):
    """--runtime --device --precision --workers --threads --graph-cache, shared by verify, predict and
    features (each adds its own --max-views or --batch)."""
    for option in reversed(_RUNTIME_OPTIONS):
        fn = option(fn)
    return fn


def _run_settings(kw: dict, max_views: int | None = None):
    """Pop the protocol, normalisation and runtime options from ``kw``: (protocol overrides, Norm, RuntimeOptions)."""
    from .run import Norm, RuntimeOptions

    norm = Norm(kw.pop("norm"), kw.pop("mean"), kw.pop("std"))
    rt = RuntimeOptions(device=kw.pop("device"), precision=kw.pop("precision"), max_views=max_views,
                        workers=kw.pop("workers"), threads=kw.pop("threads"), runtime=kw.pop("runtime"),
                        graph_cache=kw.pop("graph_cache"), silent_audio=kw.pop("silent_audio"))
    return _protocol_overrides(kw), norm, rt


def _describe_protocol(p: dict) -> str:
    size = f"resized to {p['resize'][0]}x{p['resize'][1]}" if p.get("resize") else f"short side {p['short_side']}"
    return (f"{p['name']}: {p['num_clips']} clips x {p['num_crops']} crops, {p['clip_len']} frames every "
            f"{p['frame_interval']}, {size}, crop {p['crop_size']}")


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--ann", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Annotation list: 'path label' (videos), 'frame_dir total_frames label' (rawframes) or "
                   "'video_id, num_frames, label' (Kinetics val list).")
@click.option("--data-root", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder the list's paths, frame folders or video ids are found under.")
@click.option("--ann-format", type=click.Choice(["auto", "videos", "rawframes", "kinetics"]), default="auto",
              show_default=True)
@click.option("--allow-outside-root", is_flag=True,
              help="Let list entries point outside --data-root (../x.mp4, absolute paths); refused by default.")
@click.option("--arch", type=click.Choice(ARCH_NAMES), help="Required for checkpoints without vmzconv meta.")
@_protocol_options
@click.option("--filename-tmpl", default="img_{:05d}.jpg", show_default=True,
              help="Rawframe file names (1-based index).")
@click.option("--label-map", type=click.Path(exists=True, dir_okay=False), help="Class names, one per line.")
@_runtime_options
@click.option("--max-views", type=click.IntRange(min=1),
              help="Views per forward pass (default: 1 on the CPU, where batching buys no speed and each "
                   "32x256x256 view costs ~0.45 GiB; 30 on CUDA).")
@click.option("--cache", type=click.Path(file_okay=False), help="Keep per-video probabilities here; a rerun resumes.")
@click.option("--skip-bad", is_flag=True, help="Skip (and report) videos that cannot be decoded instead of failing.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="JSON list of averaged probabilities, one per video in annotation order (MMAction2 --out).")
@click.option("--report", "report_file", type=click.Path(dir_okay=False),
              help="JSON report: metrics, counts, protocol, checkpoint sha256, runtime, timings.")
@click.option("--expect-top1", type=float, help="Fail (exit 1) unless top-1 (in percent) is within --tolerance of this.")
@click.option("--expect-top5", type=float, help="Same for top-5.")
@click.option("--expect-published", is_flag=True,
              help="Expect the published MMAction2 (else VMZ) accuracy of a known zoo checkpoint.")
@click.option("--tolerance", type=float, default=0.5, show_default=True, help="Allowed gap, in percentage points.")
@click.option("--force", is_flag=True, help="Replace an --out/--report file that is not a vmzconv verify output.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Videos left out of the inference-speed timing (per rank).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def verify(ckpt, ann, data_root, ann_format, allow_outside_root, arch, filename_tmpl, label_map, max_views, cache,
           skip_bad, out_file, report_file, expect_top1, expect_top5, expect_published, tolerance, force, warmup, quiet,
           **kw):
    """Measure CKPT's accuracy on a video list the way its published numbers were measured: by default
    the protocol in CKPT's card (CSN: MMAction2's test, 10 clips x 3 crops of 32 frames (interval 2) at
    short side 256; R(2+1)D/R3D: VMZ's test, 10 clips x 1 centre crop of 112 from 171x128 frames),
    softmax per view, mean over views; top-1, top-5 and mean class accuracy. Runs on CUDA when
    present, else CPU; under `torchrun --nproc_per_node N -m vmzconv verify ...` the list is sharded
    over ranks and the metrics equal a single-process run.
    """
    from .verify.runner import Options
    from .verify.runner import run as run_verify

    protocol, norm, rt = _run_settings(kw, max_views)
    opts = Options(str(ckpt), ann, data_root, ann_format=ann_format, arch=arch, runtime=rt, norm=norm,
                   protocol_overrides=protocol, filename_tmpl=filename_tmpl, label_map=label_map, cache=cache,
                   skip_bad=skip_bad, warmup=warmup, quiet=quiet, allow_outside_root=allow_outside_root,
                   out=out_file, report=report_file, expect_top1=expect_top1, expect_top5=expect_top5,
                   expect_published=expect_published, tolerance=tolerance, force=force)
    outcome = run_verify(opts)
    if not outcome.report:          # a non-zero rank under torchrun: rank 0 reports
        return
    rep, m = outcome.report, outcome.metrics
    ann_info, t = rep["annotations"], rep["timings"]
    click.echo(f"checkpoint   {safe(ckpt)} ({rep['checkpoint']['arch']}, {rep['checkpoint']['target']})")
    click.echo(f"videos       {ann_info['evaluated']} evaluated of {ann_info['videos']}"
               + (f"; {ann_info['skipped']} SKIPPED (unreadable): "
                  + safe(", ".join(s["video"] for s in rep["skipped"][:5])) if ann_info["skipped"] else ""))
    click.echo(f"protocol     {_describe_protocol(rep['protocol'])}")
    if ann_info.get("cache_entries_recomputed"):
        click.echo(f"note         {ann_info['cache_entries_recomputed']} unreadable --cache entries were recomputed")
    click.echo(f"top1_acc     {m['top1']:.4f}")
    click.echo(f"top5_acc     {m['top5']:.4f}")
    click.echo(f"mean_class_accuracy {m['mean_class_accuracy']:.4f}"
               + ("   (over the evaluated videos only)" if ann_info["skipped"] else ""))
    speed = t["inference_video_per_s"]
    inference = (f"{speed} video/s inference" if speed is not None
                 else f"inference speed not measured (only {t['inference_videos_timed']} videos after the "
                      f"{t['warmup_videos_excluded']} warm-up ones; lower --warmup)")
    click.echo(f"speed        {t['end_to_end_video_per_s']} video/s end to end; {inference} on {rep['device']} "
               f"({rep['runtime']}, {rep['precision']})"
               + (f"; peak GPU memory {t['peak_gpu_memory_mib']} MiB" if t["peak_gpu_memory_mib"] is not None else ""))
    if expect_published:
        click.echo("expect       published numbers of the zoo entry matched by FILE NAME only (unverified: no "
                   "sha256 of the released files is known)")
    for w in outcome.warnings:
        click.echo(f"vmzconv: warning: {safe(w)}", err=True)
    for c in outcome.checks:
        click.echo(f"expect       {c['metric']} {c['expected']:.2f}% +- {tolerance}: measured {c['measured']:.2f}% -> "
                   f"{'PASS' if c['passed'] else 'FAIL'}")
    if outcome.failed:
        raise CheckError("accuracy check failed: " + "; ".join(
            f"{c['metric']} {c['measured']:.2f}% vs expected {c['expected']:.2f}%" for c in outcome.failed))


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", type=click.Choice(["logits", "features", "both"]), default="logits", show_default=True,
              help="Graph outputs: logits [N, classes], features [N, C] (the pooled vector), or both.")
@click.option("--clip", "clip", metavar="T,H", help="Traced clip size (default: the family's parity clip).")
@click.option("--dynamic", is_flag=True, help="Make T, H and W dynamic too (the batch axis always is).")
@click.option("--opset", type=click.IntRange(min=1), help="ONNX opset (default: the newest that both the installed "
              "exporter and ONNX Runtime support; recorded in the file).")
@click.option("--arch", type=click.Choice(ARCH_NAMES), help="Required for checkpoints without vmzconv meta.")
@click.option("--card/--no-card", default=True, show_default=True, help="Also write OUT.json (the graph's metadata).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_fail_cleanly
def export(ckpt, out, output, clip, dynamic, opset, arch, card, force, as_json):
    """Export CKPT (a converted .pth/.safetensors) to OUT (.onnx), proven equal in ONNX Runtime.

    Input `video` [N, 3, T, H, W], float32, normalised as the model card says. Before the file is
    kept, ONNX Runtime (CPU) runs the fixed parity clip at batch 1 and 2 (and a second clip size with
    --dynamic) against the PyTorch model: max |difference| <= 1e-4, identical top-5, no NaN/Inf.
    Needs the optional extra: pip install 'vmzconv[onnx]'. Exit status: 0 written, 1 the check
    failed (nothing written), 2 bad input, 130 interrupted.
    """
    from .export import export as export_file

    res = export_file(ckpt, out, output=output, clip=parse_clip(clip), dynamic=dynamic, opset=opset, arch=arch,
                      card=card, force=force)
    if as_json:
        click.echo(json.dumps({"output": res.output, "arch": res.arch, "opset": res.opset, "outputs": res.outputs,
                               "dynamic": res.dynamic, "proof": res.proof.checks, "passed": res.proof.passed,
                               "seconds": res.seconds, "card": res.card}, indent=2))
        return
    for k, v in (("output", res.output), ("arch", res.arch), ("graph", f"opset {res.opset}, outputs "
                 f"{', '.join(res.outputs)}, dynamic {'N, T, H, W' if res.dynamic else 'N'}"),
                 ("proof", res.proof.summary()), ("card", res.card or "-"), ("seconds", f"{res.seconds:.1f}")):
        click.echo(f"{k:<8} {safe(v)}")


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per video.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="Class names, one per line (default: built in for Kinetics-400 and Sports-1M; "
                   "IG-65M's 359 classes have none, so indices are shown).")
@click.option("--arch", type=click.Choice(ARCH_NAMES), help="Required for checkpoints without vmzconv meta.")
@_protocol_options
@_runtime_options
@click.option("--max-views", type=click.IntRange(min=1),
              help="Views per forward pass (default: 1 on the CPU, where batching buys no speed and each "
                   "32x256x256 view costs ~0.45 GiB; 30 on CUDA).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: 0-based class indices, probabilities in 0-1.")
@_fail_cleanly
def predict(ckpt, videos, top_k, labels, arch, max_views, as_json, **kw):
    """What is in each VIDEO: CKPT's recorded test protocol (the one `verify` runs, with the same options
    and defaults), softmax per view, mean over views; the top-k classes with names and probabilities."""
    from .predict import predict as run_predict

    protocol, norm, rt = _run_settings(kw, max_views)
    results, p, conv, how = run_predict(str(ckpt), list(videos), arch=arch, top_k=top_k, labels=labels,
                                        protocol_overrides=protocol, norm=norm, runtime=rt)
    if as_json:
        click.echo(json.dumps([{"video": r.video, "top": [{"index": c, "name": n, "probability": pr}
                                                          for c, n, pr in r.top]}
                               | ({"silent_audio": True} if r.silent_audio else {}) for r in results], indent=2))
        return
    click.echo(f"{safe(ckpt)} ({conv.arch.name}, {conv.arch.num_classes} classes); protocol "
               f"{_describe_protocol(p.to_dict())}; {how['runtime']} {how['precision']} on {how['device']}")
    for r in results:
        click.echo(safe(r.video) + ("   (no audio stream: the audio tower saw silence, --silent-audio)"
                                    if r.silent_audio else ""))
        rows = [[f"  {k + 1}.", f"{pr * 100:6.2f}%", f"[{c}]", n or "(no class names for this model)"]
                for k, (c, n, pr) in enumerate(r.top)]
        click.echo(render_table(rows, right=(1,)))


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("videos", nargs=-1, type=click.Path())
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where NAME.npy (or features.h5) and index.csv go.")
@click.option("--ann", type=click.Path(exists=True, dir_okay=False),
              help="Instead of VIDEOS: a list (one video per line, or any list verify reads) under --data-root.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), help="Folder the --ann paths are under.")
@click.option("--layer", type=click.Choice(["pool", "logits", "probs", "audio", "fused"]), default="pool",
              show_default=True,
              help="pool: the globally pooled vector that feeds the classifier (2048-d, 512-d for depth 18/34; C3D: "
                   "fc7's 4096; audio-visual: the visual tower's). Audio-visual files also: audio (the audio tower's "
                   "pooled vector) and fused (av_fc2's output, what the joint classifier reads).")
@click.option("--stride", type=click.IntRange(min=1), help="Frames between window starts (default: clip_len x interval).")
@click.option("--tail", type=click.Choice(["pad", "shift", "drop"]), default="pad", show_default=True,
              help="Frames after the last whole window: pad = one more window from the next start, the last frame "
                   "repeated; shift = one more window ending at the last frame; drop = left out.")
@click.option("--num-snippets", type=click.IntRange(1, 100_000), metavar="N",
              help="Exactly N windows per video, starts evenly spread from the first frame to the last window "
                   "(BMN/BSN-style); replaces --stride and --tail.")
@click.option("--recursive", is_flag=True,
              help="VIDEOS may be folders: every video below one, named by its path below it (a/x.mp4 -> a/x.npy).")
@click.option("--fps", type=click.FloatRange(min=0.01), help="Resample the decoded frames to F frames per second first.")
@click.option("--crop", type=click.Choice(["center", "none", "three"]), default="center", show_default=True,
              help="center crop, the whole resized frame, or the mean over three crops.")
@click.option("--format", "fmt", type=click.Choice(["npy", "h5"]), default="npy", show_default=True,
              help="npy: NAME.npy + NAME.json per video; h5: one features.h5, a dataset per video (with fps and "
                   "windows as attributes), no per-video copies kept.")
@click.option("--arch", type=click.Choice(ARCH_NAMES), help="Required for checkpoints without vmzconv meta.")
@_protocol_options
@_runtime_options
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Windows per forward pass.")
@click.option("--force", is_flag=True, help="Redo videos whose outputs are up to date.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable videos (listed in skipped.txt) instead of failing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def features(ckpt, videos, out_dir, ann, data_root, layer, stride, tail, num_snippets, recursive, fps, crop, fmt,
             arch, batch, force, skip_bad, quiet, **kw):
    """Clip features of whole videos in sliding windows, for localisation and retrieval.

    Windows start at frames 0, S, 2S, ... while start + span <= frames (span = (clip_len-1) x interval + 1,
    S = --stride), then --tail decides the frames after the last whole window (default pad: every frame is
    in a window when S <= span); a video shorter than one span gives one window whose missing frames repeat
    the last. --num-snippets N gives exactly N windows instead. Per video NAME.npy [windows, D] (float32),
    plus index.csv (video,row,start_frame,end_frame,start_sec,end_sec,fps,windows) over every video
    (end_frame is the last real frame). Resumable: a video whose output matches the options and the
    checkpoint's sha256 is skipped. Under `torchrun` the videos are sharded over ranks.
    """
    from .features import Options as FeatureOptions
    from .features import run as run_features

    protocol, norm, rt = _run_settings(kw)
    opts = FeatureOptions(str(ckpt), list(videos), str(out_dir), ann=ann, data_root=data_root, arch=arch, layer=layer,
                          crop=crop, stride=stride, tail=tail, num_snippets=num_snippets, recursive=recursive, fps=fps, fmt=fmt, batch=batch, force=force, skip_bad=skip_bad,
                          quiet=quiet, runtime=rt, norm=norm, protocol_overrides=protocol)
    if not videos and not ann:
        raise VmzconvError("features: give VIDEOS, or --ann LIST with --data-root DIR")
    res = run_features(opts)
    if res.index is None:           # a non-zero rank under torchrun: rank 0 reports
        return
    click.echo(f"videos   {res.done} of {res.videos} with features"
               + (f"; {len(res.skipped)} SKIPPED (see skipped.txt)" if res.skipped else ""))
    click.echo(f"windows  {res.windows} rows of {res.dim}-d features")
    click.echo(f"index    {safe(res.index)}" + (f"\nh5       {safe(res.h5)}" if res.h5 else ""))


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("vmzconv-demo"),
              show_default=True, help="Where the demo pickle and checkpoint go.")
@click.option("--arch", type=click.Choice(ARCH_NAMES), default="ircsn_r50", show_default=True,
              help="Architecture of the demo pickle (any family and released depth).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights (the same seed writes the same bytes).")
@click.option("--classes", type=click.IntRange(1, 100_000), default=400, show_default=True,
              help="Classes of the pickle's FC: 359 (IG-65M) or 487 (Sports-1M) make a pretraining pickle "
                   "like VMZ's, which converts to a backbone file.")
@click.option("--flow", is_flag=True,
              help="An optical-flow model of --arch (a 2-channel stem, like r2.5d_d34_l32_ft_sports1m_optical_flow.pkl).")
@_fail_cleanly
def demo(out_dir, arch, seed, classes, flow):
    """Write a VMZ-format pickle (Python-2 cPickle opcodes, seeded weights) and convert it.

    Needs no download: shows the whole pipeline, parity included, on a model
    of the real size and layout.
    """
    from .arch import parse_arch_name
    from .convert import convert as convert_file
    from .synth import seeded_blobs, write_vmz_pickle

    family, depth = parse_arch_name(arch)
    if flow and (not FAMILIES[family].resnet or FAMILIES[family].av):
        raise VmzconvError(f"--flow: VMZ's optical-flow models are video ResNets, not {arch}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"demo_{arch}" + ("" if classes == 400 else f"_{classes}") + ("_flow" if flow else "")
    pkl = write_vmz_pickle(out_dir / f"{stem}.pkl",
                           seeded_blobs(family, depth, classes, seed, in_channels=2 if flow else 3))
    click.echo(f"wrote    {safe(pkl)} (VMZ format, {pkl.stat().st_size / 1e6:.1f} MB, seed {seed}, {classes} classes)")
    stages = _Stages(False)
    try:
        res = convert_file(pkl, out_dir / f"{stem}.pth", arch=arch, force=True, progress=stages)
    finally:
        stages.close()
    _print_result(res, False)
    if FAMILIES[family].av:              # a tiny video with a sound track for predict / features
        import numpy as np

        from .synth import tone_frames, write_video_with_audio

        t = np.arange(2 * 44100) / 44100
        sound = 0.3 * np.sin(2 * np.pi * (220 + 200 * t) * t)            # a 2-s chirp
        video = write_video_with_audio(out_dir / f"{stem}.mp4", tone_frames(50), sound)
        click.echo(f"wrote    {safe(video)} (2 s, 25 fps, AAC sound)")
        click.echo(safe(f"next     vmzconv predict {res.output} {video}   |   vmzconv inspect {pkl}"))
        return
    click.echo(safe(f"next     vmzconv inspect {pkl}   |   vmzconv parity {pkl} {res.output}"))


if __name__ == "__main__":
    main()
