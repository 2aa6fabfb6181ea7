# The synthetic testbed (aphq data synth): COCO layout with train/ and val/
# image folders. Images are evaluated at their own size (224-320 px).
dataset_type = 'CocoDataset'
data_root = 'data/synth/'  # replaced by the generated cache folder or --data
classes = ('square', 'rectangle', 'circle', 'ellipse', 'ring', 'triangle', 'star')
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', img_scale=[(224, 224), (352, 352)], multiscale_mode='range', keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='Pad', size_divisor=32),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels', 'gt_masks']),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        scale_factor=1.0,
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img']),
        ]),
]
data = dict(
    samples_per_gpu=4,
    workers_per_gpu=2,
    train=dict(type=dataset_type, classes=classes, data_root=data_root,
               ann_file='annotations/instances_train.json', img_prefix='train/', pipeline=train_pipeline),
    calib=dict(type=dataset_type, classes=classes, data_root=data_root,
               ann_file='annotations/instances_train.json', img_prefix='train/', pipeline=test_pipeline),
    val=dict(type=dataset_type, classes=classes, data_root=data_root,
             ann_file='annotations/instances_val.json', img_prefix='val/', pipeline=test_pipeline),
    test=dict(type=dataset_type, classes=classes, data_root=data_root,
              ann_file='annotations/instances_val.json', img_prefix='val/', pipeline=test_pipeline))
evaluation = dict(metric=['bbox', 'segm'])
# Default data: the synthetic dataset, generated into the cache on first use.
aphq_testbed = True
# Stage defaults for the testbed's small images and CPU budget (method.md's
# values stay the defaults for the COCO models): 4 calibration images, a
# smaller sample of each layer's input, and a coarser matmul percentile grid
# over fewer windows, so calibration takes seconds on two cores.
aphq_defaults = dict(calibrate=dict(calib_images=4, matmul_eq_n=32, max_windows=64, max_values=200_000))
aphq_defaults['mlp_recon'] = dict(iters=400, images=16)
aphq_defaults['reconstruct'] = dict(iters=200, images=16)
