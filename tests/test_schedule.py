import torch

from nasa_video.schedule import FlowSchedule


def test_self_forcing_warped_steps():
    steps = FlowSchedule(5.0).step_list([1000, 750, 500, 250], warp=True)
    assert [round(s, 1) for s in steps] == [1000.0, 937.5, 833.3, 625.0]


def test_causvid_steps_unwarped():
    assert FlowSchedule(8.0).step_list([1000, 757, 522], warp=False) == [1000.0, 757.0, 522.0]


def test_noise_and_velocity_round_trip():
    flow = FlowSchedule(8.0)
    x0, eps = torch.randn(1, 4, 3, 2, 2), torch.randn(1, 4, 3, 2, 2)
    t = torch.tensor([[757.0, 757.0, 522.0]])
    x_t = flow.add_noise(x0, eps, t)
    v = eps - x0  # the flow the model is trained to predict
    torch.testing.assert_close(flow.velocity_to_x0(v, x_t, t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow.x0_to_velocity(x0, x_t, t), v, rtol=1e-4, atol=1e-4)


def test_sigma_is_nearest_grid_value():
    flow = FlowSchedule(8.0)
    grid_t, grid_s = flow.timesteps(), flow.sigmas()
    assert flow.sigma(torch.tensor([1000.0])).item() == grid_s[0].item() == 1.0
    i = int((grid_t - 757).abs().argmin())
    assert flow.sigma(torch.tensor([757.0])).item() == grid_s[i].item()


def test_x0_prediction_is_read_as_x0_and_mixing_outputs_is_prediction_agnostic():
    flow = FlowSchedule(2.0)
    x_t, t = torch.randn(1, 4, 3, 2, 2), torch.full((1, 3), 750.0)
    x0_pos, x0_neg = torch.randn_like(x_t), torch.randn_like(x_t)
    assert flow.prediction_to_x0(x0_pos, x_t, t, "x0") is x0_pos
    v_pos, v_neg = flow.x0_to_velocity(x0_pos, x_t, t), flow.x0_to_velocity(x0_neg, x_t, t)
    torch.testing.assert_close(flow.prediction_to_x0(v_pos, x_t, t), x0_pos, rtol=1e-5, atol=1e-5)
    # CFG mixes the network outputs; for an x0 network that equals mixing the velocities.
    w = 3.0
    mixed_x0 = x0_neg + w * (x0_pos - x0_neg)
    torch.testing.assert_close(flow.x0_to_velocity(mixed_x0, x_t, t), v_neg + w * (v_pos - v_neg),
                               rtol=1e-4, atol=1e-4)


def test_trainers_and_the_sampler_read_one_step_list():
    """sampling.warp maps the configured steps through the shifted grid: the sampler and the trainers' student
    steps come from the same reading of the config (a student trains on the steps it samples)."""
    from nasa_video.loading import load_config
    from nasa_video.schedule import sampling_schedule
    from nasa_video.train.config import ModelSettings

    from .conftest import shared_generator

    overrides = {"sampling": {"warp": True}}
    cfg = load_config("tiny", overrides)
    _, steps = sampling_schedule(cfg)
    assert steps != [float(t) for t in cfg.sampling.steps]  # warped
    assert list(ModelSettings.of(cfg).student_steps) == steps == shared_generator("tiny", overrides).steps
