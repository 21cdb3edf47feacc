"""Downstream evaluation of pretrained encoders: the paper's protocols (README, "Evaluation").

- `linear_probe`: EuroSAT linear probe, and the demo's land-cover probe on the synthetic archive.
- `multilabel`: BigEarthNet-19 multi-label classification, frozen or fine-tuned.
- `change_detection`: OSCD change detection with the `unet` decoder; `oscd_builder` prepares OSCD.
- `segmentation`: DynamicEarthNet semantic segmentation with the `unet` decoder, frozen or
  fine-tuned; `dynamicearthnet_builder` prepares DynamicEarthNet.
- `tiling`: tiles, stitching, random crops and flips shared by the dense evaluators.
- `segmentation`: DynamicEarthNet semantic segmentation with the `unet` decoder, frozen or
  fine-tuned; `dynamicearthnet_builder` prepares DynamicEarthNet.
- `tiling`: tiles, stitching, random crops and flips shared by the dense evaluators.
- `common`: encoders to compare, TFDS reading, data-parallel feature extraction, reporting.
- `metrics`: top-1, average precision, precision / recall / F1, confusion matrix and IoU.
"""
