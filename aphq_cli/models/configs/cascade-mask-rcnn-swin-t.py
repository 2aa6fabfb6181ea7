# Cascade Mask R-CNN, Swin-T, COCO (cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco).
# Published FP AP 50.4/43.7 (T) and 51.9/45.0 (S) box/mask.
_base_ = ['./_base_/cascade_mask_rcnn_swin_fpn.py', './_base_/coco_instance.py']
model = dict(backbone=dict(depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.2))
