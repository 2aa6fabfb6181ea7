# Testbed Mask R-CNN: the Swin-T architecture at small width and depth (every
# module type of the paper's models: shifted windows with masks, window
# padding, patch merging), trained on the synthetic dataset.
_base_ = ['./_base_/mask_rcnn_swin_fpn.py', './_base_/synth_instance.py']
model = dict(
    backbone=dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], drop_path_rate=0.1),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    # Objects are 8-130 px: anchors of 16 px at stride 4 suit them better than COCO's 32.
    rpn_head=dict(in_channels=64, feat_channels=64, anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=7),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(in_channels=64, conv_out_channels=64, num_classes=7)))
