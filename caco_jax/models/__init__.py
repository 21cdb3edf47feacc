"""The networks and their weights: the torchvision-layout ResNets (`resnet`), the projection heads
(`heads`), SeCo's U-Net decoder (`unet`), and weights in and out: the encoder export (`export`),
official PyTorch weights in (`convert`, `pretrained`) and the PyTorch export (`torch_export`).

Nothing is imported here, so that a bare accelerator image can build a ResNet without Orbax.
"""
