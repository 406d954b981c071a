"""Command line: prepare, train, finetune, register, evaluate, export.

Installed with the package as ``acsgreg <command>`` (also ``python -m ACSGRegistrationLib <command>``).
Errors about the user's input end the program with a one-line message and exit code 2.
"""

import argparse
import json
import os
import sys
import time
import warnings

from .batch import short_name
from .config import METHODS, PRECISIONS
from .errors import ACSGError, InputError
from .planar import REFINE_STEPS as PLANAR_REFINE_STEPS
from .progress import STOP_FILE_VARIABLE, stage_line
from .resources import shipped_model_path
from .validation import INTENSITY_SCALES
from .xray import POSE_SEARCH_METHODS as XRAY_METHODS

DEVICE_HELP = "auto (default: a CUDA GPU where there is one), cpu, cuda, cuda:N or mps"

def _duration(seconds: float) -> str:
    for unit, length in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= 2 * length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


def _number(kind, minimum=None, maximum=None, above=None, cost=None):
    """An argparse type: a number of ``kind`` within bounds (argparse then names the option and exits 2).
    ``cost``: (seconds per unit, what that is) for an upper bound's message: how long the value would take."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        low = (minimum is not None and value < minimum) or (above is not None and value <= above)
        if value != value or low or (maximum is not None and value > maximum):
            bounds = [f"at least {minimum}" if minimum is not None else "",
                      f"above {above}" if above is not None else "",
                      f"at most {maximum}" if maximum is not None else ""]
            time_taken = ""
            if cost is not None and maximum is not None and value > maximum:
                time_taken = f" (about {cost[0]:g} s {cost[1]}: {text} would take about {_duration(value * cost[0])})"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(b for b in bounds if b)}, got {text}{time_taken}")
        return value
    return parse


COUNT = _number(int, minimum=1)
BATCH = _number(int, minimum=1, maximum=64)  # 3D crops (and ProST's CT projections) per step: memory grows with it
STEPS = _number(int, minimum=0)
# Options whose large values take long: bounded, the message says how long (measured on this project's 2-core CPU).
REFINE_STEPS = _number(int, minimum=0, maximum=2000, cost=(0.3, "a step on a CPU"))
PLANAR_STEPS = _number(int, minimum=0, maximum=5000, cost=(0.01, "a step per grid on a CPU"))
POSE_STEPS = _number(int, minimum=0, maximum=10000, cost=(0.01, "a step per view on a CPU"))
DRR_EVALUATIONS = _number(int, minimum=1, maximum=100000, cost=(0.01, "a DRR per view on a CPU"))
POSITIVE = _number(float, above=0.0)
FRACTION = _number(float, minimum=0.0, maximum=1.0)

PRECISION_HELP = ("inference precision: auto (default: bf16 where the CPU or GPU computes it natively, else "
                  "fp32), fp32 or bf16")


def _progress_printer(every: int = 10):
    start = time.perf_counter()

    def show(step, total, terms):
        if step == 1 or step % every == 0 or step == total:
            rate = (time.perf_counter() - start) / max(step, 1)
            parts = " ".join(f"{k}={v:.4f}" for k, v in terms.items() if k != "step")
            print(f"[{step}/{total}] {parts}  ({rate:.2f} s/step)", flush=True)
    return show


def stage(number: int, total: int, text: str) -> None:
    """A stage of a long command (``progress.stage_line``): what the Slicer panel's progress bar follows."""
    print(stage_line(number, total, text), flush=True)


def _refine_printer():
    def show(step, total):
        if step == 1 or step % 10 == 0 or step == total:
            print(f"refining [{step}/{total}]", flush=True)
    return show


NAMED_CONFIGS = ("paper", "compact", "tiny")


def _config_file(path):
    """A JSON model configuration file, read before any work."""
    from .config import model_config_from_dict
    try:
        with open(path) as fh:
            return model_config_from_dict(json.load(fh))
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read it ({exc.strerror or exc}); give "
                         f"{', '.join(NAMED_CONFIGS)} or a JSON model configuration file") from None
    except (ValueError, TypeError) as exc:
        raise InputError(f"--config {path} is not a valid JSON model configuration: {exc}") from None


def _model_config(args, crop_shape, crop_spacing):
    """The model to train: the paper's on the crops' own grid, or a named configuration (the crops are
    resampled to its grid)."""
    from .config import compact_config, paper_config, tiny_config
    if args.config in ("paper", None):
        cfg = paper_config(args.method)
        cfg.input_shape, cfg.input_spacing = tuple(crop_shape), float(crop_spacing)
    elif args.config == "tiny":
        cfg = tiny_config(args.method, crop_shape, crop_spacing)
    else:
        cfg = compact_config(args.method)
    # The recipe "maps" (default) makes the networks symmetric; "paper" keeps the paper's one-way networks.
    cfg.symmetric = args.recipe == "maps"
    return cfg


def _train_config(args):
    import dataclasses
    from .config import TrainConfig, loss_config
    loss = dataclasses.replace(loss_config(args.recipe), smoothness_edge_alpha=args.edge_alpha)
    return TrainConfig(learning_rate=args.lr, batch_size=args.batch_size, max_steps=args.steps,
                       checkpoint_every=args.checkpoint_every, use_labels=not args.no_labels, seed=args.seed,
                       num_workers=args.workers, loss=loss)


def _training_records(args):
    """(real crop records, mask crop records) of --crops and --synthetic-labels (each None when not given)."""
    from .readers import crop_records
    if not args.crops and not args.synthetic_labels:
        raise InputError("give --crops (real crop pairs) and/or --synthetic-labels (mask crops to synthesise from)")
    return tuple(crop_records(folder, args.out) if folder else None for folder in (args.crops, args.synthetic_labels))


def _pair_dataset(args, crops, masks_records, grid):
    """Real crop pairs (``crops``), synthetic pairs from mask crops, or both, on the network's ``grid``
    (input shape, voxel size) whatever the crops' own spacing."""
    from torch.utils.data import ConcatDataset
    from .datasets import PairDataset, make_pairs, read_crop_array
    parts, real = [], None
    if crops:
        records = [r for r in crops if r.image]  # mask-only crops: no image to pair
        pairs = make_pairs(records, mixed_levels=args.mixed_levels, max_per_moving=args.pairs_per_moving,
                           seed=args.seed)
        real = PairDataset(records, pairs, with_labels=not args.no_labels, grid=grid)
        parts.append(real)
    masks, spacing = [], float(grid[1])
    if masks_records:
        from .synthesis import SyntheticPairDataset
        records = [r for r in masks_records if r.label]
        masks = [read_crop_array(r.label, "label", grid) for r in records]
        length = args.synthetic_pairs or args.steps * args.batch_size
        parts.append(SyntheticPairDataset(masks, [r.subject for r in records], [r.level for r in records], length,
                                          seed=args.seed, mixed_levels=True, spacing=spacing))
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if args.recipe != "maps" or args.known_fraction <= 0 or args.no_labels:
        return dataset
    # Known-deformation pairs (a vertebra and a known random warp of itself) from the real crops' images and
    # the masks, mixed in: the interior carries signal and the map is supervised where the truth is known.
    from .synthesis import KnownDeformationDataset, MixedPairDataset
    crops = []
    if real is not None:
        labelled = [r for r in real.records if r.label]
        crops = [(real._array(r.image, "image"), real._array(r.label, "label")) for r in labelled]
    known = KnownDeformationDataset(crops, masks, len(dataset), seed=args.seed + 1, spacing=spacing)
    return MixedPairDataset(dataset, known, args.known_fraction, seed=args.seed + 2)


def _stop_requests():
    """Ctrl+C or SIGTERM ask the training loop to stop after its step and save (also where a shell
    started the run in the background, with SIGINT ignored); so does the file that ``$ACSG_STOP_FILE`` names
    once it exists (how the Slicer panel asks on Windows, where a windowless process gets no console signal)."""
    import signal
    requested = []
    stop_file = os.environ.get(STOP_FILE_VARIABLE)

    def handler(signum, frame):
        print(f"stop requested ({signal.Signals(signum).name}): saving after this step", flush=True)
        requested.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)

    def should_stop():
        if not requested and stop_file and os.path.exists(stop_file):
            print("stop requested (stop file): saving after this step", flush=True)
            requested.append(stop_file)
        return bool(requested)
    return should_stop


def _crop_grid(record):
    """(shape z, y, x; spacing) of a crop: a new paper-size model takes the training crops' grid."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(record.image or record.label)
    reader.ReadImageInformation()
    return reader.GetSize()[::-1], reader.GetSpacing()[0]


def _check_device(args):
    """The device and precision options, refused before any work where this machine lacks them."""
    from .inference import check_precision
    from .registrar import choose_device
    device = choose_device(args.device)
    if getattr(args, "precision", None):
        check_precision(args.precision, device)


def cmd_train(args, finetune=False):
    from .trainer import LAST, Trainer
    _check_device(args)
    # The model first (a checkpoint or a configuration file is checked before any crop is written).
    if finetune:
        from .checkpoint import load_checkpoint
        last = os.path.join(args.out, LAST)
        source = last if os.path.isfile(last) and not args.restart else args.checkpoint
        cfg, model_config = None, load_checkpoint(source)["model_config_obj"]
    else:
        # A configuration file says everything, symmetry included.
        cfg = model_config = None if args.config in NAMED_CONFIGS + (None,) else _config_file(args.config)
    crops, masks = _training_records(args)
    if model_config is None:
        cfg = model_config = _model_config(args, *_crop_grid((crops or masks)[0]))
    dataset = _pair_dataset(args, crops, masks, (model_config.input_shape, model_config.input_spacing))
    trainer = Trainer(cfg, _train_config(args), dataset, args.out,
                      init_checkpoint=args.checkpoint if finetune else None,
                      device=args.device, resume=not args.restart, progress=_progress_printer(args.print_every),
                      should_stop=_stop_requests())
    summary = trainer.train()
    print(json.dumps(summary, indent=2))
    return 0 if summary["status"] == "finished" else 130


def _register_outputs(args):
    """--outputs, with the older switches --figure, --whole-scan and --inverse adding theirs."""
    from .batch import parse_outputs
    outputs = parse_outputs(args.outputs)
    extra = [name for name, on in (("figure", args.figure), ("scan", args.whole_scan), ("inverse", args.inverse))
             if on and name not in outputs]
    return outputs + tuple(extra)


def _registrar(args, checkpoint):
    """The model, loaded (PyTorch imported: ~2 s) while the first pair's files are read."""
    from .registrar import Registrar
    _check_device(args)
    return Registrar(checkpoint, device=args.device, precision=args.precision, refine_steps=args.refine_steps,
                     progress=_refine_printer() if args.refine_steps else None)


def _single_pair(args):
    from .batch import Pair
    given = [f"--{k.replace('_', '-')}" for k in ("fixed", "moving", "fixed_seg", "moving_seg") if getattr(args, k)]
    if args.pairs:
        if given:
            raise InputError(f"give --pairs or {' and '.join(given)}, not both")
        return None
    if not (args.fixed and args.moving):
        raise InputError("give --fixed and --moving (one pair), or --pairs pairs.csv (a batch)")
    return Pair(name=os.path.basename(os.path.abspath(args.out)), fixed=args.fixed, moving=args.moving,
                fixed_seg=args.fixed_seg, moving_seg=args.moving_seg, fixed_vertebra=args.fixed_vertebra,
                moving_vertebra=args.moving_vertebra)


def cmd_register(args):
    from concurrent.futures import ThreadPoolExecutor
    from .batch import read_pair, read_pairs, save_pair
    from .outputs import REGISTRATION, check_target
    started = time.perf_counter()
    checkpoint = args.checkpoint or shipped_model_path()
    if not os.path.isfile(checkpoint):
        raise InputError(f"no model at {checkpoint}: pass --checkpoint")
    outputs = _register_outputs(args)
    pair = _single_pair(args)
    # Every input and option is checked before any work; each output folder is written as a unit at the end.
    pairs = [pair] if pair else read_pairs(args.pairs)
    if pair:
        check_target(args.out, pair.inputs() + (checkpoint,), kind=REGISTRATION)
    with ThreadPoolExecutor(1, thread_name_prefix="acsg-model") as loading:
        registrar = loading.submit(_registrar, args, checkpoint)
        if not pair:
            return _register_batch(args, pairs, registrar.result, outputs, checkpoint, started)
        stage(1, 3, "reading and cropping the vertebrae, loading the model")
        fixed, moving = read_pair(pair, args.intensity)
        read = time.perf_counter()
        for note in fixed.notes + moving.notes:
            print(f"note: {note}")
        engine = registrar.result()
    ready = time.perf_counter()
    stage(2, 3, f"registering on {engine.device}" + (f", then refining ({args.refine_steps} steps)"
                                                      if args.refine_steps else ""))
    result = engine.register(fixed.image, moving.image, fixed.label, moving.label)
    result.notes = fixed.notes + moving.notes
    registered = time.perf_counter()
    stage(3, 3, "writing the outputs")
    paths = save_pair(result, pair, fixed, moving, args.out, outputs, checkpoint)
    from .inference import describe
    print(f"registered in {result.seconds:.2f} s on {engine.device} ({describe(engine.engine)})")
    if result.metrics:
        from .evaluation import format_stage_table
        print(format_stage_table(result.metrics))
    for key, path in paths.items():
        print(f"  {key}: {path}")
    print(f"time: inputs read and cropped {read - started:.2f} s, model ready {ready - started:.2f} s (loaded "
          f"meanwhile), registered {registered - ready:.2f} s, written {time.perf_counter() - registered:.2f} s; "
          f"{time.perf_counter() - started:.2f} s in all since the command started")
    return 0


def _register_batch(args, pairs, registrar, outputs, checkpoint, started):
    from .batch import METRICS_TABLE, register_pairs

    def report(done, total, item):
        if item.status != "ok":
            print(f"[{done}/{total}] {item.pair.name}: FAILED (line {item.pair.row}): {item.error}", flush=True)
            return
        stages = " -> ".join(f"{(item.metrics or {}).get(s, {}).get('dice', float('nan')):.3f}"
                             for s in ("initial", "affine", "final")) if item.metrics else "no labels"
        rate = done / (time.perf_counter() - started)
        print(f"[{done}/{total}] {item.pair.name}: Dice {stages}, |J|<=0 "
              f"{item.folding['nonpositive_jacobian_percent']:.2f} %, {item.seconds:.2f} s "
              f"({rate:.2f} pairs/s so far)", flush=True)
    reports = register_pairs(registrar, pairs, args.out, outputs, args.intensity, args.stop_on_error, report,
                             _stop_requests(), checkpoint)
    elapsed = time.perf_counter() - started
    ok = sum(r.status == "ok" for r in reports)
    failed = len(reports) - ok
    print(f"{len(reports)} of {len(pairs)} pairs in {elapsed:.1f} s from the command's start "
          f"({len(reports) / elapsed:.2f} pairs/s): {ok} registered, {failed} failed; table: "
          f"{os.path.join(os.path.abspath(args.out), METRICS_TABLE)}")
    if len(reports) < len(pairs):
        return 130
    return 1 if failed else 0


def _methods(args, **ants_options):
    """The methods an evaluation compares: each model (and its refined variant), then ANTs SyN."""
    from .evaluation import ants_method, network_method
    from .resources import model_labels
    methods = []
    checkpoints = args.checkpoint or [shipped_model_path()]
    for checkpoint, label in zip(checkpoints, model_labels(checkpoints)):
        methods.append(network_method(checkpoint, args.device, precision=args.precision, label=label))
        if args.refine_steps:
            methods.append(network_method(checkpoint, args.device, args.refine_steps, args.precision, label))
    if args.ants:
        methods.append(ants_method(**ants_options))
    return methods


def cmd_evaluate(args):
    from .evaluation import evaluate
    _check_device(args)
    evaluate(_methods(args), args.crops, args.out, args.pairs)
    return 0


def cmd_evaluate_maps(args):
    from .map_evaluation import acceptance_markdown, evaluate_maps, read_manifest
    from .outputs import MAP_EVALUATION, check_target
    _check_device(args)
    check_target(args.out, [args.manifest], kind=MAP_EVALUATION)
    rows = evaluate_maps(_methods(args, random_seed=0), read_manifest(args.manifest), args.out,
                         seeds=range(args.seeds), pair_mode=args.pairs, kinds=args.kinds.split(","))
    print(acceptance_markdown(rows))
    print(f"tables: {os.path.join(args.out, 'maps.md')}, {os.path.join(args.out, 'maps.csv')}")
    return 0


def cmd_export(args):
    """A shippable model: weights (optionally half precision), config, versions and training summary."""
    from .checkpoint import build_model, load_checkpoint, save_checkpoint
    out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.isdir(out):
        raise InputError(f"--out {args.out} is a folder: give the file to write (for example "
                         f"{os.path.join(args.out, 'model.pt')})")
    if os.path.exists(out) and os.path.samefile(out, args.checkpoint):
        raise InputError(f"--out {args.out} is the input --checkpoint: it would be overwritten; give another file")
    payload = load_checkpoint(args.checkpoint)
    model = build_model(payload, args.checkpoint)
    keep = {k: payload[k] for k in ("summary", "step", "train_config", "history") if k in payload}
    save_checkpoint(args.out, model, model.config, half=args.half, **keep)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2 ** 20:.1f} MB, step {payload.get('step')})")
    return 0


def cmd_prepare(args):
    from .readers import prepare_manifest
    records = prepare_manifest(args.manifest, args.out, args.spacing,
                               progress=lambda k, n, name: print(f"[{k}/{n}] {name}", flush=True))
    print(f"wrote {len(records)} crops to {args.out}")
    return 0


def cmd_xray_register(args):
    from .registrar import choose_device
    from .xray.pipeline import register_files
    device = choose_device(args.device)
    done = register_files(args.ct, args.xray, args.init, args.out, args.geometry, args.ct_seg, args.label,
                          args.method, args.evaluations, args.refine_steps, args.detector_pixels, args.ct_spacing,
                          device=device, seed=args.seed, prost_model=args.prost_model,
                          depth_prior_mm=args.depth_prior_mm)
    m = done["metrics"]
    views = f", {m['views']} views" if m["views"] > 1 else ""
    print(f"gradient NCC {m['initial_similarity']:.3f} -> {m['final_similarity']:.3f} in {m['seconds']:.1f} s "
          f"({m['evaluations']} DRRs, {m['polarity']}{views})")
    for key, path in done["paths"].items():
        print(f"  {key}: {path}")
    return 0


def cmd_xray_train(args):
    from .xray.prost import ProSTConfig
    from .xray.prost_training import ProSTTrainConfig, ProSTTrainer, subjects_from_arguments
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    net_config = ProSTConfig(detector_pixels=args.detector_pixels)
    config = ProSTTrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                              rotation_deg=args.start_deg, translation_mm=args.start_mm, depth_mm=args.start_depth_mm,
                              validate_every=args.validate_every, seed=args.seed)
    subjects = subjects_from_arguments(args.ct, args.ct_seg, args.label, net_config, config.simulation_spacing_mm)
    held_out = subjects_from_arguments(args.val_ct or [], args.val_ct_seg or [], args.val_label or [], net_config,
                                       config.simulation_spacing_mm, option="--val-ct")
    trainer = ProSTTrainer(subjects, args.out, config, net_config, validation_subjects=held_out,
                           resume=not args.restart)
    summary = trainer.train(should_stop=_stop_requests())
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0 if summary["status"] == "finished" else 130


def cmd_xray_evaluate(args):
    from .io import read_image
    from .xray.evaluation import BINS, evaluate_subject, write_report
    from .xray.prost import load_prost
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from .xray.prost_training import check_ct_targets
    from .outputs import check_target
    from .xray.evaluation import REPORT_KIND
    check_target(args.out, args.ct + args.ct_seg, kind=REPORT_KIND)  # before the work, not after it
    check_ct_targets(args.ct, args.ct_seg, args.label)
    methods = _choices("--methods", args.methods, XRAY_METHODS, empty_ok=True)
    from .resources import model_labels
    models = [(label, load_prost(m)["net"]) for m, label in zip(args.prost_model or [], model_labels(
        args.prost_model or []))]
    if any(m.startswith("prost") for m in methods) and not models:
        raise InputError("the prost methods need --prost-model")
    budgets = {"cmaes+gradient": {"evaluations": args.evaluations, "refine_steps": 40},
               "cmaes": {"evaluations": args.evaluations}, "gradient": {"refine_steps": 100},
               "prost+cmaes+gradient": {"evaluations": 300, "refine_steps": 40}, "prost": {}}
    regions = _choices("--regions", args.regions, ("vertebra", "image"))
    specs = {}
    for method in methods:
        for model_name, net in (models if method.startswith("prost") else [(None, None)]):
            for region in regions:
                name = f"{method} [{model_name}]" if len(models) > 1 and model_name else method
                name += " (whole image)" if region == "image" else ""
                specs[name] = {"method": method, "learned": net, "region": region, **budgets[method]}
                if args.depth_prior_mm is not None:
                    specs[name]["depth_prior_mm"] = args.depth_prior_mm
    bins = BINS[:args.bins]
    rows = []
    for ct_path, seg_path, label in zip(args.ct, args.ct_seg, args.label):
        rows += evaluate_subject(short_name(ct_path), read_image(ct_path, "CT"), read_image(seg_path, "CT label map"),
                                 label, specs, args.cases, seed=args.seed, bins=bins, should_stop=_stop_requests(),
                                 views=args.views)
        paths = write_report(rows, args.out)  # after each CT: a long run's results so far
    with open(paths["table"]) as fh:
        print(fh.read())
    return 0


def _planar_views(cts, segs, option, offsets=(0.0,), levels=None):
    from .planar.data import TRAINING_LEVELS, spine_views_of_files
    if len(cts or []) != len(segs or []):
        raise InputError(f"give one {option}-seg per {option} (got {len(cts or [])} and {len(segs or [])})")
    views = []
    for ct, seg in zip(cts or [], segs or []):
        views += spine_views_of_files(ct, seg, levels or TRAINING_LEVELS, offsets=offsets, option=option)
    return views


def _choices(option: str, text: str, allowed, empty_ok: bool = False) -> list:
    """A comma-separated option's items, in order, each one of ``allowed``; InputError naming the option."""
    items = [w.strip() for w in (text or "").split(",") if w.strip()]
    unknown = [w for w in items if w not in allowed]
    if unknown or not (items or empty_ok):
        found = f"unknown {', '.join(unknown)}" if unknown else "nothing given"
        raise InputError(f"{option} {text!r}: {found}; choose from {', '.join(allowed)}")
    return items


def _levels(text):
    from .vertebrae import level_of
    levels = [w.strip() for w in (text or "").split(",") if w.strip()]
    bad = [w for w in levels if not level_of(w)]
    if bad:
        raise InputError(f"--levels: {', '.join(bad)} are not vertebra levels (T12, L1, ...)")
    return levels or None


def cmd_train2d(args):
    from .planar.data import TRAINING_OFFSETS
    from .planar.network import PlanarConfig
    from .planar.training import PlanarTrainConfig, PlanarTrainer
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = PlanarTrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                            similarity=args.similarity, smoothness=args.smoothness, edge_alpha=args.edge_alpha,
                            smoothness_order=args.order, dice=args.dice, seed=args.seed,
                            balance_kinds=args.balance_kinds, schedule=args.schedule)
    levels = _levels(args.levels)
    views = _planar_views(args.ct, args.ct_seg, "--ct", TRAINING_OFFSETS, levels)
    held_out = _planar_views(args.val_ct, args.val_ct_seg, "--val-ct", levels=_levels(args.val_levels) or levels)
    print(f"{len(views)} training views, {len(held_out)} held-out views", flush=True)
    trainer = PlanarTrainer(views, args.out, cfg, PlanarConfig(diffeomorphic=args.diffeomorphic),
                            validation_views=held_out, resume=not args.restart,
                            progress=_progress_printer(args.print_every), init=args.init)
    summary = trainer.train(should_stop=_stop_requests())
    print(json.dumps(summary, indent=2))
    return 0 if summary["status"] == "finished" else 130


def cmd_evaluate2d(args):
    from .planar.evaluation import REPORT_KIND, evaluate_cases, known_cases, self_cases, subject_pairs, write_report
    from .planar.model_file import load_planar
    from .outputs import check_target
    check_target(args.out, args.ct + args.ct_seg, kind=REPORT_KIND)  # before the work, not after it
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from .resources import model_labels
    nets = {label: load_planar(path)["net"] for path, label in zip(args.model or [], model_labels(args.model or []))}
    if not nets:
        from .resources import shipped_planar_model_path
        nets["shipped"] = load_planar(shipped_planar_model_path())["net"]
    from .planar.baselines import PLANAR_BASELINES
    baselines = [b for b in _choices("--baselines", args.baselines, PLANAR_BASELINES + ("none",), empty_ok=True)
                 if b != "none"]
    views = _planar_views(args.ct, args.ct_seg, "--ct", levels=_levels(args.levels))
    kinds = set(_choices("--kinds", args.kinds, ("known", "inter-subject", "self")))
    cases = (known_cases(views, range(args.seeds)) if "known" in kinds else []) + \
        (subject_pairs(views) if "inter-subject" in kinds else []) + (self_cases(views) if "self" in kinds else [])
    if not cases:
        raise InputError("no cases: inter-subject pairs need views of two CTs (repeat --ct)")
    from .planar.refinement import PlanarRefineConfig
    rows = evaluate_cases(cases, nets, baselines, progress=lambda k, n: print(f"[{k}/{n}]", flush=True)
                          if k % 10 == 0 or k == n else None, refine=PlanarRefineConfig(steps=args.refine_steps))
    paths = write_report(rows, args.out, "2D registration: known deformations and inter-subject views")
    with open(paths["summary"]) as fh:
        print(fh.read())
    return 0


def cmd_register2d(args):
    from .batch import parse_outputs
    from .outputs import OutputFolder
    from .planar.register import (DEFAULT_PLANAR_OUTPUTS, PLANAR_OUTPUTS, PlanarRegistrar, read_planar,
                                  structure_mask)
    outputs = parse_outputs(args.outputs, known=tuple(PLANAR_OUTPUTS), default=DEFAULT_PLANAR_OUTPUTS)
    folder = OutputFolder(args.out, inputs=[p for p in (args.fixed, args.moving, args.fixed_seg, args.moving_seg)
                                            if p], kind="2D registration")
    fixed, moving = read_planar(args.fixed, "fixed image"), read_planar(args.moving, "moving image")
    masks, labels = [], None
    for path, image, what, value in ((args.fixed_seg, fixed, "fixed", args.fixed_label),
                                     (args.moving_seg, moving, "moving", args.moving_label)):
        if path:
            label_map = read_planar(path, f"{what} label map")
            masks.append(structure_mask(label_map, image, value if value is not None else args.label,
                                        f"{what} label map {path}"))
            labels = label_map if what == "moving" else labels
        else:
            masks.append(None)
    registrar = PlanarRegistrar(args.model, device=args.device, refine_steps=args.refine_steps)
    result = registrar.register(fixed, moving, masks[0], masks[1], moving_labels=labels)
    with folder:
        paths = result.write_files(folder.path, outputs)
    print(f"registered in {result.seconds:.2f} s")
    if result.metrics:
        for stage, row in result.metrics.items():
            print(f"{stage:8s} dice {row['dice']:.3f}  assd {row['assd_mm']:.2f} mm")
    print(f"det J <= 0: {result.metrics['final']['nonpositive_jacobian_percent'] if result.metrics else 0:.2f} %")
    for key, path in folder.final_paths(paths).items():
        print(f"  {key}: {path}")
    return 0


class OneLineErrors(argparse.ArgumentParser):
    """A bad option is one line, as every other error (argparse would print the usage first); exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ('{self.prog} --help' lists the options)\n")


def build_parser():
    parser = OneLineErrors(prog="acsgreg",
                                     description="ACSGRegNet registration of lumbar vertebra CT.")
    sub = parser.add_subparsers(dest="command", required=True)

    def ct_targets(p, what):
        """CTs with their label maps and target vertebrae, each option repeated once per CT, in order."""
        p.add_argument("--ct", action="append", required=True, help=f"{what} (repeat for several)")
        p.add_argument("--ct-seg", action="append", required=True, help="its label map (one per --ct, same order)")
        p.add_argument("--label", action="append", type=int, required=True, help="its target vertebra's label")

    def common_training(p):
        p.add_argument("--crops", help="crops folder written by 'prepare' (any spacing: resampled to the model's "
                                       "grid), or a manifest CSV / data folder, cropped first into --out")
        p.add_argument("--synthetic-labels", help="crops folder (or data folder) of vertebra masks to synthesise "
                                                  "training pairs from")
        p.add_argument("--synthetic-pairs", type=COUNT, help="number of synthetic pairs (default: steps x batch)")
        p.add_argument("--out", required=True, help="run folder: checkpoints, history.csv")
        p.add_argument("--steps", type=COUNT, default=1000, help="total optimisation steps (default 1000)")
        p.add_argument("--batch-size", type=BATCH, default=8, help="pairs per step (default 8, the paper's)")
        p.add_argument("--lr", type=POSITIVE, default=1e-5, help="Adam learning rate (default 1e-5, the paper's)")
        p.add_argument("--checkpoint-every", type=COUNT, default=100,
                       help="save last.pt every this many steps (default 100)")
        p.add_argument("--mixed-levels", action="store_true", help="pair different vertebra levels too")
        p.add_argument("--pairs-per-moving", type=COUNT, default=None, help="random fixed partners per moving crop")
        p.add_argument("--no-labels", action="store_true", help="no Dice terms (unsupervised)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--workers", type=STEPS, default=0, help="data-loading processes")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--restart", action="store_true", help="ignore a checkpoint already in --out")
        p.add_argument("--print-every", type=COUNT, default=10)
        p.add_argument("--recipe", choices=("maps", "paper"), default="maps",
                       help="'maps' (default): symmetric networks, known-deformation pairs and the regularised "
                            "loss of config.map_loss_config(); 'paper': the paper's one-way networks and eq. (9)")
        p.add_argument("--known-fraction", type=FRACTION, default=0.5,
                       help="share of known-deformation pairs with the 'maps' recipe (default 0.5)")
        p.add_argument("--edge-alpha", type=_number(float, minimum=0.0), default=0.0,
                       help="edge-aware smoothness (Shan et al. 2017, 3D): the diffusion term weighted by "
                            "exp(-alpha |grad fixed|); 0 (default) = plain diffusion")

    p = sub.add_parser("train", help="train a model from scratch (resumes the run in --out)")
    common_training(p)
    p.add_argument("--method", choices=tuple(METHODS), default="acsgregnet")
    p.add_argument("--config", default="paper", help="'paper' (default), 'compact', 'tiny', or a JSON model config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="continue training a checkpoint on new data")
    common_training(p)
    p.add_argument("--checkpoint", required=True, help="model to start from")
    p.set_defaults(func=lambda a: cmd_train(a, finetune=True))

    p = sub.add_parser("register", help="register a moving vertebra to a fixed one (or many pairs: --pairs)")
    p.add_argument("--fixed",
                   help="fixed image: a whole scan with --fixed-seg (the vertebra is cropped), or a ready crop; "
                        "Hounsfield units or [0, 1]")
    p.add_argument("--moving", help="moving image (as --fixed)")
    p.add_argument("--fixed-seg", help="fixed label map (the scan's multi-label map, or the vertebra's mask)")
    p.add_argument("--moving-seg", help="moving label map")
    p.add_argument("--fixed-vertebra", "--fixed-label", dest="fixed_vertebra",
                   help="the vertebra in --fixed-seg: a level (L1, T12, S1), a label value, or a structure name; "
                        "may be omitted when the label map has one label")
    p.add_argument("--moving-vertebra", "--moving-label", dest="moving_vertebra",
                   help="the vertebra in --moving-seg (as --fixed-vertebra)")
    p.add_argument("--pairs", help="a batch instead of one pair: a CSV table with the columns fixed, moving, "
                                   "fixed_seg, moving_seg, fixed_vertebra, moving_vertebra, name (fixed and moving "
                                   "required; paths relative to the table); each pair is written to "
                                   "--out/<name>/, a table of all of them to --out/metrics.csv")
    p.add_argument("--stop-on-error", action="store_true",
                   help="with --pairs: stop at the first pair that fails (default: report it and carry on)")
    p.add_argument("--checkpoint", help="model (default: the shipped model)")
    p.add_argument("--outputs", default="default",
                   help="comma-separated outputs to write: default (= warped, warped_label, jacobian, transform, "
                        "metrics), all, or any of warped, warped_affine, warped_label, jacobian, transform "
                        "(forward_transform.h5: the whole map), fields (affine_transform.tfm, deformable_field.nii), "
                        "inverse (inverse_transform.h5, inverse_deformable_field.nii: computed only when asked for, "
                        "as long as the registration), metrics, figure, scan (the moving scan on the fixed one); "
                        "summary.json always")
    p.add_argument("--refine-steps", type=REFINE_STEPS, default=0,
                   help="test-time refinement: optimise the pair's affine and deformation (image similarity, "
                        "the affine's label Dice and the regularisers of config.refinement_loss_config) after "
                        "the network's answer (default 0; about 0.3 s per step on a CPU)")
    p.add_argument("--whole-scan", action="store_true", help="add the output scan (as --outputs default,scan)")
    p.add_argument("--figure", action="store_true", help="add the output figure (the paper's Figure 6)")
    p.add_argument("--inverse", action="store_true", help="add the output inverse")
    p.add_argument("--no-inverse", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--intensity", choices=INTENSITY_SCALES, default="auto",
                   help="the images' intensity scale: auto (default: Hounsfield units or [0, 1], anything else "
                        "refused), hu, unit ([0, 1]), or minmax (not CT: stretched to [0, 1])")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--out", required=True,
                   help="output folder: written as a unit (this pair's complete set, or what it held before); "
                        "with --pairs, the folder of the pairs' folders and metrics.csv")
    p.set_defaults(func=cmd_register)

    def common_evaluation(p):
        """The methods an evaluation compares (``_methods``) and where they run."""
        p.add_argument("--checkpoint", action="append",
                       help="a model to evaluate; repeat for several (default: the shipped model)")
        p.add_argument("--refine-steps", type=REFINE_STEPS, default=0,
                       help="also evaluate each model with this many steps of test-time refinement")
        p.add_argument("--ants", action="store_true", help="also run ANTs SyN (needs the package antspyx)")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)

    p = sub.add_parser("evaluate", help="the paper's tables on the pairs of a crops folder, methods side by side")
    p.add_argument("--crops", required=True)
    common_evaluation(p)
    p.add_argument("--pairs", choices=("inter-subject", "mixed", "all"), default="inter-subject",
                   help="inter-subject same level (default), mixed levels, or all pairs incl. inter-level")
    p.add_argument("--out", required=True, help="folder for metrics.csv and metrics.md")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluate-maps", help="judge the maps: regularity, inverse consistency, known-deformation "
                                             "TRE and self-registration beside Dice, methods side by side")
    p.add_argument("--manifest", required=True,
                   help="CSV of whole scans: image, label, label_id, level, subject (e.g. scripts/real_vertebrae.csv), "
                        "or a data folder in the VerSe, TotalSegmentator or AbdomenAtlas layout")
    common_evaluation(p)
    p.add_argument("--pairs", choices=("inter-subject", "mixed", "all"), default="all",
                   help="which ordered pairs of the manifest's vertebrae to register (default all)")
    p.add_argument("--seeds", type=COUNT, default=3, help="random known deformations per vertebra (default 3)")
    p.add_argument("--kinds", default="pair,known-crop,known-scan,self",
                   help="comma-separated cases: pair, known-crop, known-scan, self (default all)")
    p.add_argument("--out", required=True, help="folder for maps.csv, maps.md and acceptance.md")
    p.set_defaults(func=cmd_evaluate_maps)

    p = sub.add_parser("export", help="write a checkpoint's weights for shipping (no optimizer state)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--half", action="store_true", help="store weights in half precision")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("xray-register", help="CT to X-ray pose registration (ProST's intensity-based baseline: "
                                             "gradient NCC, CMA-ES then gradient ascent)")
    p.add_argument("--ct", required=True, help="CT in Hounsfield units (any format SimpleITK reads)")
    p.add_argument("--ct-seg", help="the CT's label map: the target vertebra's centroid is the pose's pivot")
    p.add_argument("--label", type=int, help="the target's label value in --ct-seg (may be omitted with one label)")
    p.add_argument("--xray", required=True, action="append",
                   help="2D X-ray: PNG/TIFF/NIfTI/MHA, or DICOM XA/RF/DX/CR; repeat for more views of the patient "
                        "(e.g. AP and lateral), registered together: a second view pins down the depth one view "
                        "cannot see")
    p.add_argument("--geometry", action="append",
                   help="GEOMETRY.json: source_to_detector_mm, pixel_spacing_mm [sx, sy], size, principal_point_px; "
                        "DICOM tags fill in what it omits; once for all views or once per --xray")
    p.add_argument("--init", required=True, action="append",
                   help="POSE.json {\"ct_to_source\": 4x4}: the initial pose; one per --xray, in the same order "
                        "(their differences are the C-arm's motion between the shots, kept fixed)")
    p.add_argument("--out", required=True, help="folder for pose.json, drr.nii.gz, overlay.png, metrics.json "
                                                "(the second view's: pose_2.json, ...)")
    p.add_argument("--method", choices=XRAY_METHODS, default=XRAY_METHODS[0])
    p.add_argument("--prost-model", help="ProST model for the prost methods (default: the shipped one)")
    p.add_argument("--evaluations", type=DRR_EVALUATIONS, default=400,
                   help="DRRs per CMA-ES run (two runs: from the initial pose twice, or from ProST's answer and "
                        "the initial pose; default 400)")
    p.add_argument("--refine-steps", type=POSE_STEPS, default=60, help="gradient-ascent steps (default 60)")
    p.add_argument("--depth-prior-mm", type=POSITIVE, default=None,
                   help="one view: how far (mm) the search may move the CT along the ray from the initial pose "
                        "before its prior weighs (default 60: the C-arm's source-to-patient distance known within "
                        "a few cm; narrower where it is known better)")
    p.add_argument("--detector-pixels", type=_number(int, minimum=8, maximum=512), default=96,
                   help="longest side of the registration's detector grid (default 96)")
    p.add_argument("--ct-spacing", type=_number(float, minimum=0.5, maximum=8.0), default=2.0,
                   help="the CT is resampled to this spacing in mm when finer (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_xray_register)

    p = sub.add_parser("xray-train", help="train ProST's learned similarity on simulated X-rays of CTs (the "
                                          "direction of its pose gradient supervised: double backward)")
    ct_targets(p, "a training CT")
    p.add_argument("--val-ct", action="append", help="a held-out CT for validation (default: new poses of the "
                                                     "training CTs)")
    p.add_argument("--val-ct-seg", action="append")
    p.add_argument("--val-label", action="append", type=int)
    p.add_argument("--out", required=True, help="run folder: last.pt (resumed from), model.pt, history.csv")
    p.add_argument("--steps", type=COUNT, default=3000)
    p.add_argument("--batch-size", type=BATCH, default=4)
    p.add_argument("--learning-rate", type=_number(float, above=0.0, maximum=1.0), default=1e-3)
    p.add_argument("--start-deg", type=_number(float, above=0.0, maximum=90.0), default=10.0,
                   help="σ of the training start poses' rotation offsets per axis (default 10)")
    p.add_argument("--start-mm", type=_number(float, above=0.0, maximum=200.0), default=15.0,
                   help="σ of their in-plane translation offsets (default 15)")
    p.add_argument("--start-depth-mm", type=_number(float, above=0.0, maximum=400.0), default=30.0,
                   help="σ of their depth offsets (default 30)")
    p.add_argument("--detector-pixels", type=_number(int, minimum=8, maximum=256), default=64,
                   help="the network's detector (default 64)")
    p.add_argument("--validate-every", type=COUNT, default=100)
    p.add_argument("--threads", type=COUNT, help="CPU threads for PyTorch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="start afresh even if --out holds a run")
    p.set_defaults(func=cmd_xray_train)

    p = sub.add_parser("xray-evaluate", help="CT to X-ray registration in simulation: realistic X-rays of test CTs "
                                             "at known poses, starts binned by mTRE, every method on the same cases")
    ct_targets(p, "a test CT")
    p.add_argument("--prost-model", action="append", help="a ProST model (repeat to compare several)")
    p.add_argument("--methods", default="prost+cmaes+gradient,cmaes+gradient,gradient",
                   help=f"comma-separated, from {', '.join(XRAY_METHODS)}")
    p.add_argument("--cases", type=COUNT, default=5, help="cases per start bin and CT (default 5)")
    p.add_argument("--bins", type=COUNT, default=4, help="how many of the bins 0-10, 10-20, 20-40, 40-60 mm")
    p.add_argument("--evaluations", type=DRR_EVALUATIONS, default=400,
                   help="CMA-ES's DRRs per run (two runs) without ProST; with ProST 300 per run")
    p.add_argument("--regions", default="vertebra",
                   help="where the intensity similarity compares the images, comma-separated: vertebra (around the "
                        "target's projection, as xray-register does with a label map; default), image (the whole "
                        "X-ray, as without one)")
    p.add_argument("--out", required=True, help="folder for cases.csv, summary.csv, summary.md")
    p.add_argument("--threads", type=COUNT, help="CPU threads for PyTorch")
    p.add_argument("--views", type=int, choices=(1, 2), default=1,
                   help="2: a lateral X-ray beside each AP one, registered together (the patient unmoved, the "
                        "C-arm turned 90 deg); errors of the AP view")
    p.add_argument("--depth-prior-mm", type=POSITIVE, default=None,
                   help="one view: the width of the prior on depth along the ray (xray-register's option)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_xray_evaluate)

    p = sub.add_parser("register2d", help="2D deformable registration (Shan et al. 2017): radiographs, DRRs, "
                                          "single CT slices")
    p.add_argument("--fixed", required=True, help="fixed 2D image (PNG/TIFF/NIfTI/MHA/DICOM, or a volume one slice "
                                                  "thick)")
    p.add_argument("--moving", required=True, help="moving 2D image")
    p.add_argument("--fixed-seg", help="fixed label map (same grid as --fixed)")
    p.add_argument("--moving-seg", help="moving label map")
    p.add_argument("--label", type=int, help="the structure's label value in both label maps (default: every "
                                             "non-zero pixel)")
    p.add_argument("--fixed-label", type=int, help="its value in --fixed-seg, where it differs")
    p.add_argument("--moving-label", type=int, help="its value in --moving-seg, where it differs")
    p.add_argument("--model", help="2D model (default: the shipped planar_lumbar.pt)")
    p.add_argument("--outputs", default="default",
                   help="comma-separated: default (= warped, warped_label, transform, jacobian, metrics), all, or "
                        "any of warped, warped_label, transform (transform.h5), field (field.nii), jacobian, "
                        "metrics, figure")
    p.add_argument("--refine-steps", type=PLANAR_STEPS, default=PLANAR_REFINE_STEPS,
                   help=f"test-time refinement: steps on each of two grids (default {PLANAR_REFINE_STEPS}, "
                        "about 0.5 s; 0: the network alone, about 0.02 s)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda")
    p.add_argument("--out", required=True, help="output folder (written as a unit)")
    p.set_defaults(func=cmd_register2d)

    p = sub.add_parser("train2d", help="train the 2D network without labels on views of CTs (slices, projections)")
    p.add_argument("--ct", action="append", required=True, help="a training CT (repeat for several)")
    p.add_argument("--ct-seg", action="append", required=True, help="its label map (vertebrae by level)")
    p.add_argument("--val-ct", action="append", help="a held-out CT for the validation's end-point error")
    p.add_argument("--val-ct-seg", action="append")
    p.add_argument("--out", required=True, help="run folder: last.pt (resumed from), model.pt, history.csv")
    p.add_argument("--steps", type=COUNT, default=2000)
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--learning-rate", type=_number(float, above=0.0, maximum=1.0), default=1e-3)
    p.add_argument("--similarity", choices=("lncc", "l2"), default="lncc",
                   help="lncc (default: exposures differ) or l2 (the paper's photometric loss)")
    p.add_argument("--smoothness", type=_number(float, minimum=0.0), help="its weight (default 1 with lncc, "
                                                                          "0.02 with l2)")
    p.add_argument("--edge-alpha", type=_number(float, minimum=0.0), default=10.0,
                   help="edge-awareness: weights exp(-alpha |grad I|); 0 = plain diffusion (default 10)")
    p.add_argument("--order", type=int, choices=(1, 2), default=1, help="the smoothness's derivative order")
    p.add_argument("--dice", type=_number(float, minimum=0.0), default=0.0, help="optional label Dice weight")
    p.add_argument("--levels", help="comma-separated vertebrae to centre views on (default T12, L1-L5)")
    p.add_argument("--val-levels", help="the held-out views' vertebrae (default: --levels)")
    p.add_argument("--diffeomorphic", action="store_true", help="a velocity field integrated by scaling and "
                                                                "squaring instead of the paper's displacement")
    p.add_argument("--threads", type=COUNT, help="CPU threads for PyTorch")
    p.add_argument("--print-every", type=COUNT, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="start afresh even if --out holds a run")
    p.add_argument("--init", help="a 2D model to start from (fine-tuning; e.g. the shipped planar_lumbar.pt)")
    p.add_argument("--balance-kinds", action="store_true",
                   help="draw each kind of view (sagittal, coronal, axial, lateral, AP) equally often")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate: constant, or cosine decay to 1%% over --steps")
    p.set_defaults(func=cmd_train2d)

    p = sub.add_parser("evaluate2d", help="the 2D study: known deformations and inter-subject views of test CTs, "
                                          "networks against SimpleITK's Demons and B-spline")
    p.add_argument("--ct", action="append", required=True, help="a test CT (repeat for several)")
    p.add_argument("--ct-seg", action="append", required=True, help="its label map")
    p.add_argument("--model", action="append", help="a 2D model (repeat to compare; default: the shipped one)")
    p.add_argument("--seeds", type=COUNT, default=2, help="known deformations per view (default 2)")
    p.add_argument("--refine-steps", type=PLANAR_STEPS, default=PLANAR_REFINE_STEPS,
                   help=f"each network also refined on each pair, this many steps per grid (default "
                        f"{PLANAR_REFINE_STEPS}; 0: the networks alone)")
    p.add_argument("--baselines", default="demons,bspline", help="comma-separated: demons, bspline (or none)")
    p.add_argument("--levels", help="comma-separated vertebrae to centre views on (default T12, L1-L5)")
    p.add_argument("--kinds", default="known,inter-subject,self",
                   help="comma-separated: known (known deformations of each view), inter-subject (views of two "
                        "CTs), self (each view registered to itself); default all")
    p.add_argument("--threads", type=COUNT, help="CPU threads for PyTorch")
    p.add_argument("--out", required=True, help="folder for cases.csv and summary.md")
    p.set_defaults(func=cmd_evaluate2d)

    p = sub.add_parser("prepare", help="crop vertebrae from scans listed in a manifest CSV")
    p.add_argument("--manifest", required=True,
                   help="CSV with columns image, label, label_id, level, subject; or a data folder in the "
                        "VerSe, TotalSegmentator or AbdomenAtlas layout")
    p.add_argument("--out", required=True, help="crops folder to write")
    p.add_argument("--spacing", type=_number(float, minimum=0.25, maximum=8.0), default=1.0,
                   help="voxel size of the crops in mm (default 1, the paper's); they always cover 128 x 128 x 64 mm")
    p.set_defaults(func=cmd_prepare)
    for name, command in sub.choices.items():
        if name != "export":  # export writes one file (refused where it would replace its input)
            command.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


OVERWRITE_HELP = ("write into --out even where it holds another command's output (replaced) or files of yours "
                  "(kept: never deleted); without it such a folder is refused before any work")
# Set to show the traceback of an unexpected error (a bug) instead of its one-line report.
TRACEBACK_VARIABLE = "ACSG_TRACEBACK"


def main(argv=None):
    """Run a subcommand. Every error is one line on stderr, no traceback: the command's own (bad input or
    options, exit 2), Ctrl+C ("interrupted", exit 130: output folders are written as a unit, so nothing
    half-made is left), and an unexpected one (a bug, exit 3; ``$ACSG_TRACEBACK`` shows where)."""
    from .outputs import overwriting
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(), overwriting(getattr(args, "overwrite", False)):
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            return args.func(args)
    except (ACSGError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written (an output folder keeps what it held before)", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, unless asked for the traceback
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        last = (str(exc).strip().splitlines() or [""])[-1]
        print(f"error: unexpected {type(exc).__name__}: {last} (a bug; please report it with the command; "
              f"{TRACEBACK_VARIABLE}=1 shows where it happened)", file=sys.stderr)
        return 3


def run():
    """The console command: ``main``, then the process ends at once. Tearing down PyTorch's modules at exit
    takes 0.3-0.4 s of a 2-core CPU, a tenth of a registration from a fresh process, and serves nothing: every
    output is on disk (flushed and fsync'ed) by then. ``main`` returns normally for callers in Python."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
