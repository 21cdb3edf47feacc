"""Downstream evaluation of pretrained encoders with the paper's protocols (docs/evaluation.md), one
module per dataset, each a task that evaluates every encoder row (`common`):

- `eurosat`: EuroSAT linear probe (task eval_eurosat).
- `bigearthnet`: BigEarthNet-19 multi-label classification, frozen or fine-tuned.
- `oscd`: OSCD change detection with SeCo's U-Net decoder (`models.unet`).
- `dynamicearthnet`: DynamicEarthNet semantic segmentation, frozen or fine-tuned
  (docs/dynamicearthnet.md).
- `land_cover`: the demo's land-cover probe on the synthetic archive.
- `change_scoring`: the demo's change labels against the synthetic ground truth (score_change).

Shared: `common` (the encoder rows, datasets, reporting), `heads` (training linear heads), `fit`
(the decoders' protocol), `tiling`, `metrics`; `datasets/` holds the TFDS builders of the downloads
(no TensorFlow) and the published split lists.
"""
