"""The command line of the 2D method (Shan et al. 2017): register2d, example2d, train2d, evaluate2d."""

import json

from ..cli_options import (COUNT, INPUT_FILE, INPUT_IMAGE, PLANAR_STEPS, SEED_HELP, THREADS_HELP, add_command,
                           choices, number, progress_printer, stop_requests)
from ..errors import InputError
from . import PROJECTIONS as PLANAR_PROJECTIONS, REFINE_STEPS as PLANAR_REFINE_STEPS, SLICES as PLANAR_SLICES


def _planar_views(cts, segs, option, offsets=(0.0,), levels=None):
    from .data import TRAINING_LEVELS, spine_views_of_files
    if len(cts or []) != len(segs or []):
        raise InputError(f"give one {option}-seg per {option} (got {len(cts or [])} and {len(segs or [])})")
    views = []
    for ct, seg in zip(cts or [], segs or []):
        views += spine_views_of_files(ct, seg, levels or TRAINING_LEVELS, offsets=offsets, option=option)
    return views


def _levels(text, option="--levels"):
    from ..vertebrae import level_of
    levels = [w.strip() for w in (text or "").split(",") if w.strip()]
    bad = [w for w in levels if not level_of(w)]
    if bad:
        raise InputError(f"{option}: {', '.join(bad)} are not vertebra levels (T12, L1, ...)")
    return levels or None


def cmd_train2d(args):
    from .data import TRAINING_OFFSETS
    from .network import PlanarConfig
    from .training import PlanarTrainConfig, PlanarTrainer
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = PlanarTrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                            similarity=args.similarity, smoothness=args.smoothness, edge_alpha=args.edge_alpha,
                            smoothness_order=args.order, dice=args.dice, seed=args.seed,
                            balance_kinds=args.balance_kinds, schedule=args.schedule)
    levels = _levels(args.levels)
    views = _planar_views(args.ct, args.ct_seg, "--ct", TRAINING_OFFSETS, levels)
    held_out = _planar_views(args.val_ct, args.val_ct_seg, "--val-ct", levels=_levels(args.val_levels, "--val-levels") or levels)
    print(f"{len(views)} training views, {len(held_out)} held-out views", flush=True)
    trainer = PlanarTrainer(views, args.out, cfg, PlanarConfig(diffeomorphic=args.diffeomorphic),
                            validation_views=held_out, resume=not args.restart,
                            progress=progress_printer(args.print_every), init=args.init)
    summary = trainer.train(should_stop=stop_requests())
    print(json.dumps(summary, indent=2))
    return 0 if summary["status"] == "finished" else 130


def cmd_evaluate2d(args):
    from .evaluation import REPORT_KIND, evaluate_cases, known_cases, self_cases, subject_pairs, write_report
    from .model_file import load_planar
    from ..outputs import check_target
    check_target(args.out, args.ct + args.ct_seg, kind=REPORT_KIND)  # before the work, not after it
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from ..resources import model_labels
    nets = {label: load_planar(path)["net"] for path, label in zip(args.model or [], model_labels(args.model or []))}
    if not nets:
        from ..resources import shipped_planar_model_path
        nets["shipped"] = load_planar(shipped_planar_model_path())["net"]
    from .baselines import PLANAR_BASELINES
    baselines = [b for b in choices("--baselines", args.baselines, PLANAR_BASELINES + ("none",), empty_ok=True)
                 if b != "none"]
    views = _planar_views(args.ct, args.ct_seg, "--ct", levels=_levels(args.levels))
    kinds = set(choices("--kinds", args.kinds, ("known", "inter-subject", "self")))
    cases = (known_cases(views, range(args.seeds)) if "known" in kinds else []) + \
        (subject_pairs(views) if "inter-subject" in kinds else []) + (self_cases(views) if "self" in kinds else [])
    if not cases:
        raise InputError("no cases: inter-subject pairs need views of two CTs (repeat --ct)")
    from .refinement import PlanarRefineConfig
    rows = evaluate_cases(cases, nets, baselines, progress=lambda k, n: print(f"[{k}/{n}]", flush=True)
                          if k % 10 == 0 or k == n else None, refine=PlanarRefineConfig(steps=args.refine_steps))
    paths = write_report(rows, args.out, "2D registration: known deformations and inter-subject views")
    with open(paths["summary"]) as fh:
        print(fh.read())
    return 0


def cmd_register2d(args):
    from ..batch import parse_outputs
    from ..io import read_whole
    from ..outputs import OutputFolder
    from .register import (DEFAULT_PLANAR_OUTPUTS, PLANAR_OUTPUTS, PlanarRegistrar, check_true_field, read_planar,
                           structure_mask)
    outputs = parse_outputs(args.outputs, known=tuple(PLANAR_OUTPUTS), default=DEFAULT_PLANAR_OUTPUTS)
    folder = OutputFolder(args.out, inputs=[p for p in (args.fixed, args.moving, args.fixed_seg, args.moving_seg,
                                                         args.true_field) if p], kind="2D registration")
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
    true_field = None if not args.true_field else read_whole(args.true_field, "--true-field")
    if true_field is not None:
        check_true_field(true_field, fixed, f"--true-field {args.true_field}")
    import torch
    torch.set_num_threads(args.threads)
    registrar = PlanarRegistrar(args.model, device=args.device, refine_steps=args.refine_steps)
    result = registrar.register(fixed, moving, masks[0], masks[1], moving_labels=labels)
    if true_field is not None:
        result.compare_with_true_map(true_field, f"--true-field {args.true_field}")
    with folder:
        paths = result.write_files(folder.path, outputs)
    print(f"registered in {result.seconds:.2f} s")
    metrics = result.metrics or {}
    for stage in ("initial", "final"):
        if stage in metrics:
            print(f"{stage:8s} dice {metrics[stage]['dice']:.3f}  assd {metrics[stage]['assd_mm']:.2f} mm")
    if "true_map" in metrics:
        row = metrics["true_map"]
        print(f"error against the true map, inside {row['where']}: mean {row['epe_mean_mm']:.2f} mm, 95 % "
              f"{row['epe_p95_mm']:.2f} mm, max {row['epe_max_mm']:.2f} mm (unregistered: mean "
              f"{row['identity_epe_mean_mm']:.2f} mm)")
    print(f"det J <= 0: {result.folding_stats['nonpositive_jacobian_percent']:.2f} %")
    for key, path in folder.final_paths(paths).items():
        print(f"  {key}: {path}")
    return 0


def cmd_example2d(args):
    from ..outputs import OutputFolder
    from .example import EXAMPLE_KIND, make_example, register_command, write_example
    if bool(args.moving_ct) != bool(args.moving_ct_seg):
        raise InputError("give --moving-ct and --moving-ct-seg together (the second CT and its label map), or "
                         "neither (the moving image is then a known deformation of the fixed one)")
    from ..vertebrae import level_of
    level = level_of(args.level)
    if level is None or "," in args.level:
        raise InputError(f"--level {args.level!r}: give one vertebra level (L3, L1, T12, ...)")
    inputs = [p for p in (args.ct, args.ct_seg, args.moving_ct, args.moving_ct_seg) if p]
    folder = OutputFolder(args.out, inputs=inputs, kind=EXAMPLE_KIND)  # refused before any work
    example = make_example(args.ct, args.ct_seg, level, args.view, args.moving_ct, args.moving_ct_seg, args.seed)
    with folder:
        paths = write_example(example, folder.path)
    print(f"2D example: {example.description['moving']['what']}, {args.view} view centred on {level} "
          f"(label {example.fixed_label})")
    for key, path in folder.final_paths(paths).items():
        print(f"  {key}: {path}")
    from ..outputs import beside
    registered = beside(args.out, "registered")
    print("register it (a few seconds on a CPU)" + (", measured against the true map" if example.true_field
                                                     is not None else "") + ":")
    print(f"  {register_command(example, args.out, registered)}")
    print("or the PNG copies, as radiographs come:")
    print(f"  {register_command(example, args.out, registered + '-png', 'png')}")
    return 0


def add_commands(sub):
    """The 2D method's subcommands, each with its options, help and an example."""
    p = add_command(sub, "register2d", "2D deformable registration (Shan et al. 2017): radiographs, DRRs, "
                                       "single CT slices",
                    "acsgreg register2d --fixed fixed.png --moving moving.png --outputs default,figure --out out/2d")
    p.add_argument("--fixed", required=True, type=INPUT_IMAGE,
                   help="fixed 2D image (PNG/TIFF/NIfTI/MHA/DICOM, or a volume one slice thick)")
    p.add_argument("--moving", required=True, type=INPUT_IMAGE, help="moving 2D image")
    p.add_argument("--fixed-seg", type=INPUT_IMAGE, help="fixed label map (same grid as --fixed)")
    p.add_argument("--moving-seg", type=INPUT_IMAGE, help="moving label map")
    p.add_argument("--label", type=int, help="the structure's label value in both label maps (default: every "
                                             "non-zero pixel)")
    p.add_argument("--fixed-label", type=int, help="its value in --fixed-seg, where it differs (default: --label)")
    p.add_argument("--moving-label", type=int, help="its value in --moving-seg, where it differs (default: --label)")
    p.add_argument("--model", type=INPUT_FILE, help="2D model (default: the shipped planar_lumbar.pt)")
    p.add_argument("--outputs", default="default",
                   help="comma-separated: default (= warped, warped_label, transform, jacobian, metrics), all, or "
                        "any of warped, warped_label, transform (transform.h5), field (field.nii), jacobian, "
                        "metrics, figure")
    p.add_argument("--refine-steps", type=PLANAR_STEPS, default=PLANAR_REFINE_STEPS,
                   help=f"test-time refinement: steps on each of two grids (default {PLANAR_REFINE_STEPS}, "
                        "about 0.5 s; 0: the network alone, about 0.02 s)")
    p.add_argument("--true-field", type=INPUT_IMAGE,
                   help="a true map to measure the registration against (default: none): a 2D displacement field "
                        "on the fixed image's grid, fixed point -> moving point, mm, as field.nii (example2d's "
                        "true_field.nii); its end-point error goes to the output and metrics.json")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda")
    p.add_argument("--threads", type=COUNT, default=1,
                   help="CPU threads for PyTorch (default 1: a view of 128 x 128 pixels gains nothing from more, and "
                        "where other programs keep the cores busy two threads took 5-11 s against one's 0.5-0.8 s)")
    p.add_argument("--out", required=True, help="output folder (written as a unit)")
    p.set_defaults(func=cmd_register2d)

    p = add_command(sub, "example2d", "2D example images to register at once, made from a CT and its vertebra "
                                      "labels: a view through a vertebra and a known deformation of it (or another "
                                      "CT's view)",
                    "acsgreg example2d --ct ../shared/data/ct/totalsegmentator-example/ct.nii.gz \\\n"
                    "    --ct-seg ../shared/data/ct/totalsegmentator-example/seg.nii.gz --out out/example2d")
    p.add_argument("--ct", required=True, type=INPUT_IMAGE, help="the CT the fixed image is a view of")
    p.add_argument("--ct-seg", required=True, type=INPUT_IMAGE, help="its label map (vertebrae by level)")
    p.add_argument("--level", default="L3", help="the vertebra the views are centred on (default L3); it must be "
                                                 "whole in the scan")
    p.add_argument("--view", choices=PLANAR_SLICES + PLANAR_PROJECTIONS, default="sagittal",
                   help="sagittal (default), coronal or axial slice through the vertebra's centroid, or lateral or "
                        "ap projection (a radiograph-like line integral)")
    p.add_argument("--moving-ct", type=INPUT_IMAGE,
                   help="a second CT: the moving image is its view of the same level, an inter-subject pair "
                        "(default: none; the moving image is a known deformation of the fixed one, the true map "
                        "written beside it)")
    p.add_argument("--moving-ct-seg", type=INPUT_IMAGE, help="its label map (with --moving-ct; default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the known deformation's random draws (default 0)")
    p.add_argument("--out", required=True, help="folder for fixed.nii.gz, moving.nii.gz, fixed_seg.nii.gz, "
                                                "moving_seg.nii.gz, their PNG copies, true_field.nii and example.json "
                                                "(written as a unit)")
    p.set_defaults(func=cmd_example2d)

    p = add_command(sub, "train2d", "train the 2D network without labels on views of CTs (slices, projections)",
                    "acsgreg train2d --ct ../shared/data/ct/totalsegmentator-example/ct.nii.gz \\\n"
                    "    --ct-seg ../shared/data/ct/totalsegmentator-example/seg.nii.gz --steps 100 --out runs/2d")
    p.add_argument("--ct", action="append", required=True, type=INPUT_IMAGE, help="a training CT (repeat for several)")
    p.add_argument("--ct-seg", action="append", required=True, type=INPUT_IMAGE,
                   help="its label map (vertebrae by level)")
    p.add_argument("--val-ct", action="append", type=INPUT_IMAGE,
                   help="a held-out CT for the validation's end-point error (default: none)")
    p.add_argument("--val-ct-seg", action="append", type=INPUT_IMAGE, help="its label map (one per --val-ct)")
    p.add_argument("--out", required=True, help="run folder: last.pt (resumed from), model.pt, history.csv")
    p.add_argument("--steps", type=COUNT, default=2000, help="optimisation steps (default 2000)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="image pairs per step (default 8)")
    p.add_argument("--learning-rate", type=number(float, above=0.0, maximum=1.0), default=1e-3,
                   help="Adam learning rate (default 0.001)")
    p.add_argument("--similarity", choices=("lncc", "l2"), default="lncc",
                   help="lncc (default: exposures differ) or l2 (the paper's photometric loss)")
    p.add_argument("--smoothness", type=number(float, minimum=0.0), help="its weight (default 1 with lncc, "
                                                                         "0.02 with l2)")
    p.add_argument("--edge-alpha", type=number(float, minimum=0.0), default=10.0,
                   help="edge-awareness: weights exp(-alpha |grad I|); 0 = plain diffusion (default 10)")
    p.add_argument("--order", type=int, choices=(1, 2), default=1,
                   help="the smoothness's derivative order (default 1)")
    p.add_argument("--dice", type=number(float, minimum=0.0), default=0.0,
                   help="optional label Dice weight (default 0: unsupervised)")
    p.add_argument("--levels", help="comma-separated vertebrae to centre views on (default T12, L1-L5)")
    p.add_argument("--val-levels", help="the held-out views' vertebrae (default: --levels)")
    p.add_argument("--diffeomorphic", action="store_true", help="a velocity field integrated by scaling and "
                                                                "squaring instead of the paper's displacement")
    p.add_argument("--threads", type=COUNT, help=THREADS_HELP)
    p.add_argument("--print-every", type=COUNT, default=50, help="print the losses every this many steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--restart", action="store_true", help="start afresh even if --out holds a run")
    p.add_argument("--init", type=INPUT_FILE,
                   help="a 2D model to start from (fine-tuning; e.g. the shipped planar_lumbar.pt; default: new "
                        "weights)")
    p.add_argument("--balance-kinds", action="store_true",
                   help="draw each kind of view (sagittal, coronal, axial, lateral, AP) equally often")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate: constant (default), or cosine decay to 1%% over --steps")
    p.set_defaults(func=cmd_train2d)

    p = add_command(sub, "evaluate2d", "the 2D study: known deformations and inter-subject views of test CTs, "
                                       "networks against SimpleITK's Demons and B-spline",
                    "acsgreg evaluate2d --ct ../shared/data/ct/totalsegmentator-example/ct.nii.gz \\\n"
                    "    --ct-seg ../shared/data/ct/totalsegmentator-example/seg.nii.gz --kinds known,self "
                    "--out out/2d-study")
    p.add_argument("--ct", action="append", required=True, type=INPUT_IMAGE, help="a test CT (repeat for several)")
    p.add_argument("--ct-seg", action="append", required=True, type=INPUT_IMAGE, help="its label map")
    p.add_argument("--model", action="append", type=INPUT_FILE,
                   help="a 2D model (repeat to compare; default: the shipped one)")
    p.add_argument("--seeds", type=COUNT, default=2, help="known deformations per view (default 2)")
    p.add_argument("--refine-steps", type=PLANAR_STEPS, default=PLANAR_REFINE_STEPS,
                   help=f"each network also refined on each pair, this many steps per grid (default "
                        f"{PLANAR_REFINE_STEPS}; 0: the networks alone)")
    p.add_argument("--baselines", default="demons,bspline",
                   help="comma-separated: demons, bspline (or none); default both")
    p.add_argument("--levels", help="comma-separated vertebrae to centre views on (default T12, L1-L5)")
    p.add_argument("--kinds", default="known,inter-subject,self",
                   help="comma-separated: known (known deformations of each view), inter-subject (views of two "
                        "CTs), self (each view registered to itself); default all")
    p.add_argument("--threads", type=COUNT, help=THREADS_HELP)
    p.add_argument("--out", required=True, help="folder for cases.csv and summary.md")
    p.set_defaults(func=cmd_evaluate2d)
