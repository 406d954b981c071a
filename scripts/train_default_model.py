"""How the shipped default model is trained: inter-subject shape pairs beside known-deformation pairs.

    python scripts/train_default_model.py OUT_DIR [--steps N] [--init CHECKPOINT] [--threads T]

- inter-subject pairs: CT-like vertebrae drawn from the real masks of ../shared/data/shapes (different
  subjects, any level; ``synthesis.SyntheticPairDataset``), trained with LNCC, Dice and the regularisers;
- known-deformation pairs (``synthesis.KnownDeformationDataset``): a vertebra and a random affine + smooth
  warp of itself, imaged again, from synthetic images of those masks and from real crops of the
  TotalSegmentator example CT's L2-L5 (its L1 and the chest CT are kept out of training for evaluation);
  trained on the end-point error of the map inside the vertebra as well.
The loss is ``config.map_loss_config()``; the model ``config.compact_config()`` with ``symmetric=True``.
Resumes the run in OUT_DIR; Ctrl+C or SIGTERM stops after the current step and saves.
"""

import argparse
import dataclasses
import os
import signal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.checkpoint import build_model, load_checkpoint, save_checkpoint
from ACSGRegistrationLib.crops import read_index
from ACSGRegistrationLib.config import TrainConfig, compact_config, map_loss_config
from ACSGRegistrationLib.preprocessing import CROP_SIZE, crop_vertebra
from ACSGRegistrationLib.readers import prepare
from ACSGRegistrationLib.synthesis import KnownDeformationDataset, MixedPairDataset, SyntheticPairDataset
from ACSGRegistrationLib.trainer import Trainer

DATA = os.path.join(ROOT, "..", "shared", "data")
TRAINING_CT = ("totalsegmentator-example", (30, 29, 28, 27))  # L2-L5; L1 held out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--known-fraction", type=float, default=0.5)
    parser.add_argument("--init", help="start from these weights (e.g. the previous shipped model)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--edge-alpha", type=float, default=0.0,
                        help="edge-aware smoothness (Shan et al. 2017): diffusion weighted by exp(-alpha |grad F|); "
                             "0 = plain diffusion, the default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compact_config()
    cfg.symmetric = True
    spacing = cfg.input_spacing
    size = tuple(int(round(n / spacing)) for n in CROP_SIZE)

    shape_dir = os.path.join(args.out, "shape_crops")
    if not os.path.isfile(os.path.join(shape_dir, "crops.csv")):
        prepare(os.path.join(args.data, "shapes"), shape_dir, size=size, spacing=spacing)
    records = [r for r in read_index(shape_dir) if r.label]
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(r.label)).astype(np.float32) for r in records]

    folder, ids = TRAINING_CT
    ct = sitk.ReadImage(os.path.join(args.data, "ct", folder, "ct.nii.gz"))
    seg = sitk.ReadImage(os.path.join(args.data, "ct", folder, "seg.nii.gz"))
    crops = []
    for label_id in ids:
        crop = crop_vertebra(ct, seg, label_id, size=size, spacing=spacing)
        crops.append((sitk.GetArrayFromImage(crop.image), sitk.GetArrayFromImage(crop.label).astype(np.float32)))

    length = args.steps * args.batch_size
    inter = SyntheticPairDataset(masks, [r.subject for r in records], [r.level for r in records], length,
                                 seed=1, mixed_levels=True, spacing=spacing)
    known = KnownDeformationDataset(crops, masks, length, seed=2, spacing=spacing, real_fraction=0.5)
    dataset = MixedPairDataset(inter, known, args.known_fraction, seed=3)

    train = TrainConfig(learning_rate=args.lr, batch_size=args.batch_size, max_steps=args.steps,
                        checkpoint_every=args.checkpoint_every,
                        loss=dataclasses.replace(map_loss_config(), smoothness_edge_alpha=args.edge_alpha))
    init = None
    if args.init and not os.path.isfile(os.path.join(args.out, "last.pt")):
        # The previous model's weights under the new (symmetric) configuration.
        init = os.path.join(args.out, "init.pt")
        payload = load_checkpoint(args.init)
        save_checkpoint(init, build_model(payload, args.init, config=cfg), cfg)
    requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: requested.append(s))

    def show(step, total, terms):
        if step == 1 or step % 10 == 0:
            print(f"[{step}/{total}] " + " ".join(f"{k}={v:.4f}" for k, v in terms.items() if k != "step"),
                  flush=True)
    trainer = Trainer(None if init else cfg, train, dataset, args.out, init_checkpoint=init, device="cpu",
                      progress=show, should_stop=lambda: bool(requested))
    print(trainer.train())


if __name__ == "__main__":
    main()
