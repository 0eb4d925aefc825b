"""Distillation of block-causal few-step students, CausVid's two stages, with NASA-T (arXiv 2412.02687).

    trainer.py      what both stages share: random streams per rank, the teacher-forcing mask, FSDP sharding,
                    atomic resumable checkpoints, the run loop
    ode.py          the first stage, ODE regression onto the teacher's CFG trajectories
    dmd.py          the second stage, DMD, and NASA-T (negative prompts sampled by a pluggable sampler)
    data.py         training clips on disk (ClipFolder) and drawing a batch
    distributed.py  torchrun: process group, FSDP2 per Wan block, sharded checkpoints
    config.py       the training YAML read once into typed views
    setup.py        the commands: train_from_config (ode, dmd), make_ode_pairs, the meta-device dry run

Where this departs from upstream CausVid, on purpose: the student's context is the clean frames (teacher
forcing: a clean copy of the clip beside the noisy blocks), as the KV cache holds clean frames at inference,
where CausVid shows each block its noisy predecessors (diffusion forcing) and samples t = 0 blocks among
them; and an EMA of the generator is optional (CausVid has none). So start DMD from this package's ODE stage
(trained the same way) rather than from CausVid's ODE checkpoint if the two should match.
"""
