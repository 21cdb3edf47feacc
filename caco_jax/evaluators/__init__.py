"""Downstream evaluation of pretrained encoders with the paper's protocols (docs/evaluation.md), one
module per dataset, each a task that evaluates every encoder row (`common`):

- `eurosat`: EuroSAT linear probe (task eval_eurosat).
- `bigearthnet`: BigEarthNet-19 multi-label classification, frozen or fine-tuned.
- `oscd`: OSCD change detection with SeCo's U-Net decoder (`models.unet`).
- `dynamicearthnet`: DynamicEarthNet semantic segmentation, frozen or fine-tuned
  (docs/dynamicearthnet.md).
- `land_cover`: the demo's land-cover probe on the synthetic archive.
- `change_scoring`: the demo's change labels against the synthetic ground truth (score_change).

Shared: `protocol` (what a dataset module declares, and the one runner of every evaluation task),
`common` (the encoder rows, datasets, the metrics file and table), `heads` (the linear-head engine),
`fit` (the fitting loop through the encoder: BigEarthNet fine-tuning, OSCD, DynamicEarthNet),
`tiling`, `metrics` (scikit-learn, and the official per-batch aggregation); `datasets/` holds the
TFDS builders of the downloads (no TensorFlow) and the published split lists.
"""
