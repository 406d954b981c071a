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

from .config import METHODS, PRECISIONS
from .errors import ACSGError, InputError
from .resources import shipped_model_path
from .validation import INTENSITY_SCALES
from .xray import POSE_SEARCH_METHODS as XRAY_METHODS

DEVICE_HELP = "auto (default: a CUDA GPU where there is one), cpu, cuda, cuda:N or mps"

def _number(kind, minimum=None, maximum=None, above=None):
    """An argparse type: a number of ``kind`` within bounds (argparse then names the option and exits 2)."""
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
            raise argparse.ArgumentTypeError(f"must be {' and '.join(b for b in bounds if b)}, got {text}")
        return value
    return parse


COUNT = _number(int, minimum=1)
STEPS = _number(int, minimum=0)
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
    from .config import TrainConfig, loss_config
    return TrainConfig(learning_rate=args.lr, batch_size=args.batch_size, max_steps=args.steps,
                       checkpoint_every=args.checkpoint_every, use_labels=not args.no_labels, seed=args.seed,
                       num_workers=args.workers, loss=loss_config(args.recipe))


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
    started the run in the background, with SIGINT ignored)."""
    import signal
    requested = []

    def handler(signum, frame):
        print(f"stop requested ({signal.Signals(signum).name}): saving after this step", flush=True)
        requested.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return lambda: bool(requested)


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


def _short(path):
    """'folder/file' of a path: scans are often all called ct.nii.gz."""
    return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def cmd_register(args):
    from .inference import describe
    from .inputs import read_input
    from .outputs import OutputFolder
    from .registrar import Registrar
    checkpoint = args.checkpoint or shipped_model_path()
    if not os.path.isfile(checkpoint):
        raise InputError(f"no model at {checkpoint}: pass --checkpoint")
    _check_device(args)
    # Every input and option is checked before any work; the folder is written as a unit at the end.
    folder = OutputFolder(args.out, inputs=(args.fixed, args.moving, args.fixed_seg, args.moving_seg, checkpoint),
                          kind="registration")
    fixed = read_input(args.fixed, args.fixed_seg, args.fixed_vertebra, "fixed", args.intensity)
    moving = read_input(args.moving, args.moving_seg, args.moving_vertebra, "moving", args.intensity)
    for note in fixed.notes + moving.notes:
        print(f"note: {note}")
    registrar = Registrar(checkpoint, device=args.device, precision=args.precision, refine_steps=args.refine_steps,
                          progress=_refine_printer() if args.refine_steps else None)
    with folder:
        result = registrar.register(fixed.image, moving.image, fixed.label, moving.label)
        paths = result.write_files(folder.path, inverse=not args.no_inverse)
        if args.whole_scan:
            from .geometry import write_image
            paths["moving_on_fixed_scan"] = os.path.join(folder.path, "moving_on_fixed_scan.nii.gz")
            write_image(result.warp_scan(moving.source, fixed.source), paths["moving_on_fixed_scan"])
            if args.moving_seg:
                from .io import read_image
                paths["moving_seg_on_fixed_scan"] = os.path.join(folder.path, "moving_seg_on_fixed_scan.nii.gz")
                labels = read_image(args.moving_seg, "moving label map")
                write_image(result.warp_scan(labels, fixed.source, label=True), paths["moving_seg_on_fixed_scan"])
        if args.figure:
            from .figures import registration_figure
            paths["figure"] = os.path.join(folder.path, "figure.png")
            registration_figure(result, paths["figure"], fixed_label=fixed.label,
                                title=f"{_short(args.moving)} -> {_short(args.fixed)}")
    print(f"registered in {result.seconds:.2f} s on {registrar.device} ({describe(registrar.engine)})")
    if result.metrics:
        from .evaluation import format_stage_table
        print(format_stage_table(result.metrics))
    for key, path in folder.final_paths(paths).items():
        print(f"  {key}: {path}")
    return 0


def _methods(args, **ants_options):
    """The methods an evaluation compares: each model (and its refined variant), then ANTs SyN."""
    from .evaluation import ants_method, network_method
    methods = []
    for checkpoint in args.checkpoint or [shipped_model_path()]:
        methods.append(network_method(checkpoint, args.device, precision=args.precision))
        if args.refine_steps:
            methods.append(network_method(checkpoint, args.device, args.refine_steps, args.precision))
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
    from .outputs import check_target
    _check_device(args)
    check_target(args.out, [args.manifest])
    rows = evaluate_maps(_methods(args, random_seed=0), read_manifest(args.manifest), args.out,
                         seeds=range(args.seeds), pair_mode=args.pairs, kinds=args.kinds.split(","))
    print(acceptance_markdown(rows))
    print(f"tables: {os.path.join(args.out, 'maps.md')}, {os.path.join(args.out, 'maps.csv')}")
    return 0


def cmd_export(args):
    """A shippable model: weights (optionally half precision), config, versions and training summary."""
    from .checkpoint import build_model, load_checkpoint, save_checkpoint
    payload = load_checkpoint(args.checkpoint)
    model = build_model(payload, args.checkpoint)
    keep = {k: payload[k] for k in ("summary", "step", "train_config", "history") if k in payload}
    save_checkpoint(args.out, model, model.config, half=args.half, **keep)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2 ** 20:.1f} MB, step {payload.get('step')})")
    return 0


def cmd_prepare(args):
    from .readers import prepare_manifest
    records = prepare_manifest(args.manifest, args.out, args.spacing)
    print(f"wrote {len(records)} crops to {args.out}")
    return 0


def cmd_xray_register(args):
    from .registrar import choose_device
    from .xray.pipeline import register_files
    device = choose_device(args.device)
    done = register_files(args.ct, args.xray, args.init, args.out, args.geometry, args.ct_seg, args.label,
                          args.method, args.evaluations, args.refine_steps, args.detector_pixels, args.ct_spacing,
                          device=device, seed=args.seed, prost_model=args.prost_model)
    m = done["metrics"]
    print(f"gradient NCC {m['initial_similarity']:.3f} -> {m['final_similarity']:.3f} in {m['seconds']:.1f} s "
          f"({m['evaluations']} DRRs, {m['polarity']})")
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
    check_ct_targets(args.ct, args.ct_seg, args.label)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in XRAY_METHODS]
    if unknown:
        raise InputError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(XRAY_METHODS)})")
    models = [(os.path.basename(os.path.dirname(os.path.abspath(m))), load_prost(m)["net"])
              for m in args.prost_model or []]
    if any(m.startswith("prost") for m in methods) and not models:
        raise InputError("the prost methods need --prost-model")
    budgets = {"cmaes+gradient": {"evaluations": args.evaluations, "refine_steps": 40},
               "cmaes": {"evaluations": args.evaluations}, "gradient": {"refine_steps": 100},
               "prost+cmaes+gradient": {"evaluations": 300, "refine_steps": 40}, "prost": {}}
    specs = {}
    for method in methods:
        for model_name, net in (models if method.startswith("prost") else [(None, None)]):
            name = f"{method} [{model_name}]" if len(models) > 1 and model_name else method
            specs[name] = {"method": method, "learned": net, **budgets[method]}
    bins = BINS[:args.bins]
    rows = []
    for ct_path, seg_path, label in zip(args.ct, args.ct_seg, args.label):
        rows += evaluate_subject(_short(ct_path), read_image(ct_path, "CT"), read_image(seg_path, "CT label map"),
                                 label, specs, args.cases, seed=args.seed, bins=bins, should_stop=_stop_requests())
        paths = write_report(rows, args.out)  # after each CT: a long run's results so far
    with open(paths["table"]) as fh:
        print(fh.read())
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="acsgreg",
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
        p.add_argument("--batch-size", type=COUNT, default=8, help="pairs per step (default 8, the paper's)")
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

    p = sub.add_parser("train", help="train a model from scratch (resumes the run in --out)")
    common_training(p)
    p.add_argument("--method", choices=tuple(METHODS), default="acsgregnet")
    p.add_argument("--config", default="paper", help="'paper' (default), 'compact', 'tiny', or a JSON model config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="continue training a checkpoint on new data")
    common_training(p)
    p.add_argument("--checkpoint", required=True, help="model to start from")
    p.set_defaults(func=lambda a: cmd_train(a, finetune=True))

    p = sub.add_parser("register", help="register a moving vertebra to a fixed one")
    p.add_argument("--fixed", required=True,
                   help="fixed image: a whole scan with --fixed-seg (the vertebra is cropped), or a ready crop; "
                        "Hounsfield units or [0, 1]")
    p.add_argument("--moving", required=True, help="moving image (as --fixed)")
    p.add_argument("--fixed-seg", help="fixed label map (the scan's multi-label map, or the vertebra's mask)")
    p.add_argument("--moving-seg", help="moving label map")
    p.add_argument("--fixed-vertebra", "--fixed-label", dest="fixed_vertebra",
                   help="the vertebra in --fixed-seg: a level (L1, T12, S1), a label value, or a structure name; "
                        "may be omitted when the label map has one label")
    p.add_argument("--moving-vertebra", "--moving-label", dest="moving_vertebra",
                   help="the vertebra in --moving-seg (as --fixed-vertebra)")
    p.add_argument("--checkpoint", help="model (default: the shipped model)")
    p.add_argument("--refine-steps", type=STEPS, default=0,
                   help="test-time refinement: optimise the pair's affine and deformation (image similarity, "
                        "the affine's label Dice and the regularisers of config.refinement_loss_config) after "
                        "the network's answer (default 0; about 0.3 s per step on a CPU)")
    p.add_argument("--whole-scan", action="store_true",
                   help="also write the moving scan (and its label map) resampled onto the fixed scan's grid through "
                        "the transform: moving_on_fixed_scan.nii.gz, moving_seg_on_fixed_scan.nii.gz")
    p.add_argument("--figure", action="store_true", help="also write figure.png (the paper's Figure 6)")
    p.add_argument("--no-inverse", action="store_true",
                   help="leave out inverse_transform.h5 and inverse_deformable_field.nii.gz (they take as long as "
                        "the registration)")
    p.add_argument("--intensity", choices=INTENSITY_SCALES, default="auto",
                   help="the images' intensity scale: auto (default: Hounsfield units or [0, 1], anything else "
                        "refused), hu, unit ([0, 1]), or minmax (not CT: stretched to [0, 1])")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--out", required=True,
                   help="output folder: written as a unit (this pair's complete set, or what it held before)")
    p.set_defaults(func=cmd_register)

    def common_evaluation(p):
        """The methods an evaluation compares (``_methods``) and where they run."""
        p.add_argument("--checkpoint", action="append",
                       help="a model to evaluate; repeat for several (default: the shipped model)")
        p.add_argument("--refine-steps", type=STEPS, default=0,
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
    p.add_argument("--xray", required=True, help="2D X-ray: PNG/TIFF/NIfTI/MHA, or DICOM XA/RF/DX/CR")
    p.add_argument("--geometry", help="GEOMETRY.json: source_to_detector_mm, pixel_spacing_mm [sx, sy], size, "
                                      "principal_point_px; DICOM tags fill in what it omits")
    p.add_argument("--init", required=True, help="POSE.json {\"ct_to_source\": 4x4}: the initial pose")
    p.add_argument("--out", required=True, help="folder for pose.json, drr.nii.gz, overlay.png, metrics.json")
    p.add_argument("--method", choices=XRAY_METHODS, default=XRAY_METHODS[0])
    p.add_argument("--prost-model", help="ProST model for the prost methods (default: the shipped one)")
    p.add_argument("--evaluations", type=COUNT, default=600, help="CMA-ES's budget of DRRs (default 600)")
    p.add_argument("--refine-steps", type=STEPS, default=60, help="gradient-ascent steps (default 60)")
    p.add_argument("--detector-pixels", type=COUNT, default=96,
                   help="longest side of the registration's detector grid (default 96)")
    p.add_argument("--ct-spacing", type=_number(float, above=0.0, maximum=8.0), default=2.0,
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
    p.add_argument("--batch-size", type=COUNT, default=4)
    p.add_argument("--learning-rate", type=_number(float, above=0.0, maximum=1.0), default=1e-3)
    p.add_argument("--start-deg", type=_number(float, above=0.0, maximum=90.0), default=10.0,
                   help="σ of the training start poses' rotation offsets per axis (default 10)")
    p.add_argument("--start-mm", type=_number(float, above=0.0, maximum=200.0), default=15.0,
                   help="σ of their in-plane translation offsets (default 15)")
    p.add_argument("--start-depth-mm", type=_number(float, above=0.0, maximum=400.0), default=30.0,
                   help="σ of their depth offsets (default 30)")
    p.add_argument("--detector-pixels", type=COUNT, default=64, help="the network's detector (default 64)")
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
    p.add_argument("--evaluations", type=COUNT, default=400, help="CMA-ES's DRRs per run without ProST")
    p.add_argument("--out", required=True, help="folder for cases.csv, summary.csv, summary.md")
    p.add_argument("--threads", type=COUNT, help="CPU threads for PyTorch")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_xray_evaluate)

    p = sub.add_parser("prepare", help="crop vertebrae from scans listed in a manifest CSV")
    p.add_argument("--manifest", required=True,
                   help="CSV with columns image, label, label_id, level, subject; or a data folder in the "
                        "VerSe, TotalSegmentator or AbdomenAtlas layout")
    p.add_argument("--out", required=True, help="crops folder to write")
    p.add_argument("--spacing", type=_number(float, above=0.0, maximum=8.0), default=1.0,
                   help="voxel size of the crops in mm (default 1, the paper's); they always cover 128 x 128 x 64 mm")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            return args.func(args)
    except (ACSGError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
