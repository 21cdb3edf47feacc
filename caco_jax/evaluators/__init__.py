"""Downstream evaluation of pretrained encoders with the paper's protocols (docs/evaluation.md).

- `linear_probe`: EuroSAT linear probe, and the demo's land-cover probe on the synthetic archive.
- `multilabel`: BigEarthNet-19 multi-label classification, frozen or fine-tuned.
- `change_detection`: OSCD change detection with the `unet` decoder.
- `segmentation`: DynamicEarthNet semantic segmentation with the `unet` decoder, frozen or
  fine-tuned (docs/dynamicearthnet.md).
- `eurosat_builder`, `bigearthnet_builder`, `oscd_builder`, `dynamicearthnet_builder`: TFDS records
  from the downloads, no TensorFlow; `split_lists`: the published split lists; `bands`: the
  encoder's bands from each dataset.
- `tiling`: tiles, stitching, random crops and flips shared by the dense evaluators.
- `common`: encoders to compare, datasets, data-parallel feature extraction, reporting.
- `metrics`: top-1, average precision, precision / recall / F1, confusion matrix and IoU.
"""
