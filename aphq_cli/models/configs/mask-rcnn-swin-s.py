# Mask R-CNN, Swin-S, COCO (mask_rcnn_swin_small_patch4_window7_mstrain_480-800_adamw_3x_coco).
# Published FP AP 46.0/41.6 (T) and 48.5/43.3 (S) box/mask.
_base_ = ['./_base_/mask_rcnn_swin_fpn.py', './_base_/coco_instance.py']
model = dict(backbone=dict(depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.3))
