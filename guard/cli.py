"""`python -m guard`: classify images with a purified model, inspect an artifact, check the machine.

    python -m guard classify IMG... --model PURIFIED [--json] [--top-k K] [--backend B] [--device D]
    python -m guard inspect PURIFIED [--json]
    python -m guard doctor [--json]
    python -m guard calibrate PURIFIED --data DIR [--fpr 0.01] [--json]
    python -m guard serve PURIFIED [--host 127.0.0.1] [--port 8080] [--max-batch 32] [--max-wait-ms 0]

Exit codes: guard.console's table (0 success; 2 usage or input error, such as bad
arguments or an unreadable image; 3 artifact or model error; 4 export error; 1 unexpected
error, printed after its traceback; 130 interrupted). Errors are one line on stderr,
"error: ...". Results go to stdout, logs (-v) to stderr. See docs/cli.md.

Adding a subcommand: write `run_NAME(args) -> int` and `add_NAME(commands)`, which
makes its parser with `_subparser` and `set_defaults(run=run_NAME)`, and list
`add_NAME` in SUBCOMMANDS. Raise clip-guard's typed errors; console.run turns them into
the exit codes above.

guard never imports training/ or export/: the built-in data sets reach calibration through
`python -m training.calibrate`, which reads them and calls `calibrate_from` with its images.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from . import __version__, console
from .errors import ArtifactError, DataError, InputError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (never raises, except BrokenPipeError)."""
    return console.run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)  # a usage error or --help exits; console.run keeps its code
    console.setup_logging(args.verbose, default=logging.WARNING)
    return args.run(args)


def fail(message) -> None:
    """One line on stderr, whatever the message's own line breaks."""
    console.fail(message)


def emit(text: str) -> None:
    """The command's result, on stdout."""
    print(text, flush=True)


# --- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m guard", description="Serve and check purified CLIP models.",
        epilog=console.EPILOG)
    parser.add_argument("--version", action="version", version=f"clip-guard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def _subparser(commands, name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
    """A subcommand's parser with the options every command has."""
    parser = commands.add_parser(name, help=summary, description=description or summary,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress and debug messages to stderr")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --- classify -----------------------------------------------------------------------------

def add_classify(commands) -> None:
    parser = _subparser(commands, "classify", "classify images with a purified model",
                        "Classify image files. One line per image: path, the top K labels and\n"
                        "probabilities, then the trigger alert (alert, clear or uncalibrated, and the\n"
                        "score), tab-separated. A bad image is reported on stderr and the others are\n"
                        "still classified; the exit code is then 2.")
    parser.add_argument("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, WebP, ...)")
    parser.add_argument("--model", required=True, metavar="PURIFIED",
                        help="purified artifact directory (or a compiled model guard.load reads)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    parser.add_argument("--top-k", type=_positive_int, default=1, metavar="K",
                        help="how many labels to show per image (default 1)")
    parser.add_argument("--backend", default="auto", metavar="B",
                        help="auto (default), torch, onnxruntime, aoti or tensorrt: see `doctor`")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: CUDA if any)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (64)")
    parser.add_argument("--no-alerts", action="store_true",
                        help="classify only: skip the trigger alert and its extra forward rows")
    parser.set_defaults(run=run_classify)


def run_classify(args) -> int:
    import guard

    check_device(args.device)
    if not Path(args.model).exists():
        raise ArtifactError(f"{args.model}: no such artifact directory or compiled model")
    with guard.load(args.model, backend=args.backend, device=args.device) as model:
        log.info("classifying %d images with %r", len(args.images), model)
        outcomes = classify_each(model, args.images, args.batch_size, alerts=not args.no_alerts)
    records = []
    for image, outcome in zip(args.images, outcomes):
        if isinstance(outcome, InputError):
            fail(outcome)
            records.append({"input": image, "error": str(outcome)})
        else:
            top = outcome.top_k(args.top_k)
            records.append({"input": image, "label": outcome.label, "index": outcome.index, "score": outcome.score,
                            "top_k": [{"label": label, "prob": prob} for label, prob in top],
                            "probs": dict(zip(outcome.classes, outcome.probs)),
                            "alert_status": outcome.alert_status, "alert": outcome.alert,
                            "alert_score": outcome.alert_score, "threshold": outcome.threshold})
    if args.json:
        emit(json.dumps(records, indent=2))
    else:
        for record in records:
            if "error" not in record:
                pairs = [f"{pair['label']}\t{pair['prob']:.4f}" for pair in record["top_k"]]
                if record["alert_score"] is not None:
                    pairs.append(f"{record['alert_status']}\t{record['alert_score']:.4f}")
                emit("\t".join([record["input"], *pairs]))
    return console.EXIT_USAGE if any("error" in record for record in records) else console.EXIT_OK


def classify_each(model, images: Sequence, batch_size: int, alerts: bool = True) -> list:
    """A Classification or the InputError for each image: a bad image does not stop the others.
    Batches run whole; only a batch with a bad image is redone one image at a time."""
    outcomes = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        try:
            outcomes.extend(model.classify(chunk, batch_size=batch_size, alerts=alerts))
        except InputError:
            for image in chunk:
                try:
                    outcomes.append(model.classify(image, alerts=alerts))
                except InputError as error:
                    outcomes.append(error)
    return outcomes


def check_device(device: str | None) -> None:
    """InputError when `device` names CUDA and there is none (every --device option's check)."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here (see `python -m guard doctor`)")


# --- inspect ------------------------------------------------------------------------------

def add_inspect(commands) -> None:
    parser = _subparser(commands, "inspect", "summarise an artifact and verify its files",
                        "Show what a purified artifact is (format, base model, classes, method,\n"
                        "hyperparameters, metrics) and check every file against its recorded size\n"
                        "and sha256. Exit code 3 when the manifest or any file does not verify.")
    parser.add_argument("artifact", metavar="PURIFIED", type=Path, help="purified artifact directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run_inspect)


def run_inspect(args) -> int:
    summary = inspect_artifact(args.artifact)
    emit(json.dumps(summary, indent=2) if args.json else format_inspection(summary))
    damaged = [entry for entry in summary["files"] if not entry["verified"]]
    if damaged:
        listed = ", ".join(f"{entry['name']} ({entry['problem']})" for entry in damaged)
        fail(f"{len(damaged)} of {len(summary['files'])} files of {summary['path']} do not verify: {listed}; "
             "restore them from a copy or re-create the artifact")
        return console.EXIT_MODEL
    return console.EXIT_OK


def inspect_artifact(path) -> dict:
    """The manifest's summary (its own checksum and version checked) and each file verified."""
    from .artifact import read_manifest

    directory = Path(path)
    manifest = read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{directory / 'manifest.json'} has no table of files; the artifact is damaged")
    method = manifest.get("method") or {}
    return {
        "path": str(directory),
        "format": manifest.get("format"),
        "format_version": manifest.get("format_version"),
        "clip_guard_version": manifest.get("clip_guard_version"),
        "base_model": manifest.get("base_model"),
        "classes": manifest.get("classes"),
        "templates": manifest.get("templates"),
        "preprocess": manifest.get("preprocess"),
        "visual_prompts": manifest.get("visual_prompts"),
        "method": method.get("name"),
        "hyperparameters": method.get("hyperparameters"),
        "metrics": manifest.get("metrics"),
        "alert": manifest.get("alert"),
        "alert_calibration": manifest.get("alert_calibration"),
        "files": [_verify(directory, name, record) for name, record in files.items()],
    }


def _verify(directory: Path, name: str, record) -> dict:
    from .hashing import sha256_file

    record = record if isinstance(record, dict) else {}
    entry = {"name": name, "bytes": record.get("bytes"), "sha256": record.get("sha256"),
             "actual_bytes": None, "actual_sha256": None}
    file = directory / name
    if Path(name).name != name or name in ("", ".", ".."):
        problem = "not a file name inside the artifact"
    elif not file.is_file():
        problem = "missing"
    else:
        entry["actual_bytes"] = file.stat().st_size
        entry["actual_sha256"] = sha256_file(file)
        if entry["actual_sha256"] != entry["sha256"]:
            problem = "sha256 differs"
        elif entry["bytes"] is not None and entry["actual_bytes"] != entry["bytes"]:
            problem = f"{entry['actual_bytes']} bytes, {entry['bytes']} recorded"
        else:
            problem = None
    entry.update(verified=problem is None, problem=problem)
    return entry


def format_inspection(summary: dict) -> str:
    written = (f"{summary['format']} version {summary['format_version']}, written by clip-guard "
               f"{summary['clip_guard_version']}")
    rows = [("artifact", summary["path"]), ("format", written)]
    base = summary["base_model"] if isinstance(summary["base_model"], dict) else {}
    identity = [str(base.get("spec"))]
    if base.get("source_format"):
        identity.append(f"({base['source_format']})")
    rows.append(("base model", " ".join(identity) + f", sha256 {base.get('sha256') or 'not recorded'}, "
                                                    f"QuickGELU {'yes' if base.get('quick_gelu') else 'no'}"))
    config = base.get("model_cfg") if isinstance(base.get("model_cfg"), dict) else {}
    if config:
        vision = config.get("vision_cfg") or {}
        rows.append(("architecture", f"embed_dim {config.get('embed_dim')}; vision "
                     + ", ".join(f"{key} {value}" for key, value in vision.items())))
    classes = summary["classes"] or []
    rows.append((f"classes ({len(classes)})", ", ".join(map(str, classes))))
    rows.append(("templates", " | ".join(map(str, summary["templates"] or []))))
    preprocess = summary["preprocess"] or {}
    rows.append(("preprocess", ", ".join(f"{key} {value}" for key, value in preprocess.items())))
    prompts = summary["visual_prompts"]
    rows.append(("visual prompts", "none" if not prompts else
                 f"{prompts.get('num_tokens')} tokens in each of {prompts.get('num_blocks')} blocks "
                 f"from block {prompts.get('start_block')}"))
    rows.append(("method", summary["method"]))
    for title, values in (("hyperparameters", summary["hyperparameters"]), ("metrics", summary["metrics"])):
        flat = _flatten(values or {})
        rows.append((title, "none" if not flat else ""))
        rows.extend((f"  {key}", value) for key, value in flat)
    rows.append(("alert", _describe_alert(summary["alert"], summary["alert_calibration"])))
    rows.append(("files", ""))
    for entry in summary["files"]:
        size = "?" if entry["bytes"] is None else f"{entry['bytes']:,} bytes"
        state = "ok" if entry["verified"] else f"DOES NOT VERIFY: {entry['problem']}"
        rows.append((f"  {entry['name']}", f"{size}  sha256 {entry['sha256']}  {state}"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}".rstrip() for key, value in rows)


def _describe_alert(alert, calibration) -> str:
    alert = alert if isinstance(alert, dict) else {}
    perturbations = ", ".join(map(str, alert.get("perturbations", ("open:3", "median:3")) or ())) or "the image"
    method = f"{alert.get('statistic', 'pr_terms')} over {perturbations}"
    if alert.get("threshold") is None:
        return f"{method}; NOT CALIBRATED (run `python -m guard calibrate`)"
    text = f"{method}; threshold {alert['threshold']:.6g}"
    if isinstance(calibration, dict):
        text += (f" at fpr {calibration.get('fpr')} from {calibration.get('images')} clean images "
                 f"({calibration.get('data') or 'unnamed data'}, {calibration.get('date')})")
    return text


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted.key, value) rows; floats to 6 significant digits."""
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append((name, f"{value:.6g}" if isinstance(value, float) else str(value)))
    return rows


# --- doctor -------------------------------------------------------------------------------

def add_doctor(commands) -> None:
    parser = _subparser(commands, "doctor", "report versions, accelerators and usable backends",
                        "Report the versions of Python, torch, open_clip, numpy, Pillow, onnx,\n"
                        "onnxruntime (and its providers) and TensorRT, CUDA devices, which guard\n"
                        "backends can run here, and the custom kernels' status. Builds nothing.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_doctor)


def run_doctor(args) -> int:
    from .doctor import format_report, report

    data = report()
    emit(json.dumps(data, indent=2, default=str) if args.json else format_report(data))
    return console.EXIT_OK


# --- calibrate ----------------------------------------------------------------------------

def add_calibrate(commands) -> None:
    parser = _subparser(commands, "calibrate", "set the trigger-alert threshold from clean images",
                        "Score clean images with the model's trigger alert and store the threshold at\n"
                        "the target false-alarm rate (the (1 - fpr) quantile of their scores), with the\n"
                        "calibration statistics, in the artifact's manifest or the compiled model's\n"
                        "sidecar. Use images the model was not purified on. Nothing is written when\n"
                        "an image cannot be read. A built-in data set (fashion-mnist, digits, scenes):\n"
                        "`python -m training.calibrate`, which takes the same options.")
    parser.add_argument("model", metavar="PURIFIED", help="purified artifact directory or compiled model")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="a directory of clean images (searched recursively); where its sub-folders are "
                             "named after the model's classes, they label the images (for the density)")
    add_calibration_options(parser)
    parser.set_defaults(run=run_calibrate)


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """The options of `calibrate` other than the model and the data, which `python -m
    training.calibrate` shares."""
    parser.add_argument("--fpr", type=float, default=0.01, help="target false-alarm rate on clean inputs (0.01)")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help="use at most this many images, a seeded random choice (2000; 4000 for the detector, "
                             "which trains on half of them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that choice (0)")
    parser.add_argument("--perturbations", default=None, metavar="P1,P2",
                        help="recalibrate with these perturbations, e.g. open:3,median:3; a last 'frozen' adds "
                        "the frozen-tower view (artifacts only) (default: the model's)")
    parser.add_argument("--statistic", default=None,
                        help="recalibrate with this statistic (default: the model's); 'density' (artifacts only) "
                        "fits the feature density on the images and takes no perturbation, or only 'frozen'; "
                        "'detector' (artifacts only) trains the input detector on them and takes no perturbation")
    parser.add_argument("--detector-families", default=None, metavar="F1,F2",
                        help="synthetic trigger families the detector trains on "
                             "(default: all of patch,blend,sine,warp)")
    parser.add_argument("--detector-steps", type=_positive_int, default=None,
                        help="detector training steps (1000)")
    parser.add_argument("--backend", default="auto", metavar="B", help="auto (default), torch, onnxruntime, ...")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA if any)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (64)")
    parser.add_argument("--json", action="store_true", help="print the calibration record as JSON")


def run_calibrate(args) -> int:
    return calibrate_from(args, lambda limit, classes: calibration_images(args.data, limit, args.seed, classes))


def calibrate_from(args, read_images) -> int:
    """`calibrate` with the options of add_calibration_options; read_images(limit, the model's
    classes) -> (images, a description, labels or None) is called once the model verified."""
    from .alert_kinds import kind_of
    from .alerts import AlertConfig
    from .calibration import calibrate, model_document
    from .detector import DetectorConfig
    from .manifest import Manifest

    check_device(args.device)
    if not 0.0 < args.fpr < 1.0:
        raise InputError(f"--fpr must lie in (0, 1), got {args.fpr}")
    if not Path(args.model).exists():
        raise ArtifactError(f"{args.model}: no such artifact directory or compiled model")
    # Read (and verify) the model's document before any image is loaded: a bad model fails fast.
    manifest = Manifest.from_document(*model_document(args.model)[:2])
    current = manifest.alert_config
    config = None
    if args.perturbations is not None or args.statistic is not None:
        statistic = args.statistic or current.statistic
        fitted = kind_of(statistic).fitted_type is not None
        if args.perturbations is not None:
            config = AlertConfig(tuple(args.perturbations.split(",")) if args.perturbations else (), statistic)
        else:  # a fitted kind takes no perturbation unless asked; the others keep the model's
            config = AlertConfig(() if fitted else current.perturbations, statistic,
                                 frozen_tower=not fitted and current.frozen_tower)
    detector = DetectorConfig(**{name: value for name, value in (
        ("families", args.detector_families and tuple(args.detector_families.split(","))),
        ("steps", args.detector_steps)) if value is not None})
    limit = args.limit or kind_of((config or current).statistic).calibration_images
    images, description, labels = read_images(limit, manifest.classes)
    log.info("calibrating %s on %d images of %s", args.model, len(images), description)
    record = calibrate(args.model, images, args.fpr, data=description, backend=args.backend, device=args.device,
                       config=config, batch_size=args.batch_size, progress=_progress, labels=labels, detector=detector,
                       training_progress=_training_progress)
    if args.json:
        emit(json.dumps(record, indent=2))
    else:
        emit(f"threshold {record['threshold']:.6g} at fpr {record['fpr']} from {record['images']} clean images "
             f"of {description} (clean alert rate {record['clean_alert_rate']:.4f}); stored in {args.model}")
    return console.EXIT_OK


def calibration_images(data: str, limit: int, seed: int,
                       classes: Sequence[str] = ()) -> tuple[list, str, Optional[list[int]]]:
    """(image files, a description, their labels or None) for --data, a directory of image
    files: at most `limit`, a seeded random choice when there are more. The images are
    labelled when every one lies in a sub-folder named after one of `classes` (an image
    folder of the model's classes, as `python -m training.calibrate` writes)."""
    import torch

    from .inputs import image_files

    directory = Path(data)
    if not directory.is_dir():
        raise DataError(f"--data {data}: neither a directory of images nor anything else guard reads; for a "
                        "built-in data set run `python -m training.calibrate MODEL --data fashion-mnist`")
    files = image_files(directory)
    if not files:
        raise DataError(f"{data} holds no image files (any format Pillow reads)")
    index_of = {name: index for index, name in enumerate(classes)}
    folders = [file.relative_to(directory).parts[0] if len(file.relative_to(directory).parts) > 1 else None
               for file in files]
    labels = [index_of[folder] for folder in folders] if all(folder in index_of for folder in folders) else None
    images, description = [str(file) for file in files], str(data)
    if len(images) > limit:
        chosen = sorted(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
        images = [images[index] for index in chosen]
        labels = None if labels is None else [labels[index] for index in chosen]
        description += f", {limit} images chosen with seed {seed}"
    return images, description, labels


def _progress(done: int, total: int) -> None:
    print(f"calibrate: read {done}/{total} images", file=sys.stderr, flush=True)


def _training_progress(step: int, steps: int) -> None:
    print(f"calibrate: trained the input detector for {step}/{steps} steps", file=sys.stderr, flush=True)


# --- serve --------------------------------------------------------------------------------

def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535 (0: any free port), got {value}")
    return value


def add_serve(commands) -> None:
    parser = _subparser(commands, "serve", "serve a purified model over HTTP (needs the serve extra)",
                        "Serve a purified model over HTTP until SIGTERM or Ctrl-C (in-flight requests\n"
                        "finish first): POST /v1/classify (an image file's bytes, or JSON {\"images\":\n"
                        "[base64, ...]}), GET /healthz, GET /metrics (Prometheus). Images of concurrent\n"
                        "requests are batched into one model call. Progress lines go to stderr. See\n"
                        "docs/serving.md.")
    parser.add_argument("model", metavar="PURIFIED", help="purified artifact directory (or a compiled model "
                                                          "guard.load reads)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0: every "
                                                            "interface)")
    parser.add_argument("--port", type=_port, default=8080, help="port to listen on (8080; 0: any free port)")
    parser.add_argument("--backend", default="auto", metavar="B", help="auto (default), torch, onnxruntime, ...")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA if any)")
    parser.add_argument("--max-batch", type=_positive_int, default=32,
                        help="most images of concurrent requests in one model call (32)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="how long a batch waits for more images after its first (0: it takes what is queued "
                             "when the model is free)")
    parser.add_argument("--no-batching", action="store_true",
                        help="one model call per image, concurrently (for comparison)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=16 * 2 ** 20,
                        help="largest request body accepted (16 MiB); larger ones get 413")
    parser.add_argument("--max-images", type=_positive_int, default=64,
                        help="most images in one JSON request (64); more get 413")
    parser.add_argument("--no-alerts", action="store_true",
                        help="classify only: skip the trigger alert and its extra forward rows")
    parser.add_argument("--threads", type=_positive_int, default=4, help="threads that decode images (4)")
    parser.add_argument("--shutdown-timeout", type=_positive_int, default=30,
                        help="seconds in-flight requests get to finish on SIGTERM (30)")
    parser.add_argument("--torch-threads", type=_positive_int, default=None,
                        help="torch's intra-op threads (default: torch's choice on the torch backend, 1 on compiled "
                             "backends, whose engines have their own threads)")
    parser.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from .serve import ServeConfig, serve  # MissingDependencyError without the serve extra

    check_device(args.device)
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, batching=not args.no_batching,
                         max_body_bytes=args.max_body_bytes, max_images=args.max_images, alerts=not args.no_alerts,
                         threads=args.threads, shutdown_timeout=args.shutdown_timeout,
                         torch_threads=args.torch_threads)
    serve(args.model, host=args.host, port=args.port, backend=args.backend, device=args.device, config=config,
          status=_serve_status)
    return console.EXIT_OK


def _serve_status(line: str) -> None:
    print(f"serve: {line}", file=sys.stderr, flush=True)


# Each adds one subcommand.
SUBCOMMANDS = [add_classify, add_inspect, add_doctor, add_calibrate, add_serve]
