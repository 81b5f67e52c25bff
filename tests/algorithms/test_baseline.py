"""Pre-train + fine-tune baselines: Baseline, Baseline++, RFS (and P>M>F fine-tuning)."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from datamodules import EpisodeBatch, LabelledBatch, Omniglot
from lightning_meta import RFS, Baseline, BaselinePlusPlus, Conv4, ProtoNet, load_checkpoint
from lightning_meta.cli import make_cli

REPO = Path(__file__).resolve().parents[2]


def omniglot(cache: dict, **kwargs) -> Omniglot:
    settings = {"ways": 5, "shots": 1, "queries": 15, "train_batches": "labelled", "batch_size": 64, **kwargs}
    return Omniglot(root=cache["root"], cache_dir=cache["cache_dir"], **settings)


def trainer(**kwargs) -> pl.Trainer:
    settings = {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                "enable_model_summary": False, "inference_mode": False, "accelerator": "cpu",
                "num_sanity_val_steps": 0, **kwargs}  # fmt: skip
    return pl.Trainer(**settings)


def pretraining_accuracy(model: Baseline, dm: Omniglot) -> float:
    """Accuracy of the pre-training classifier on the first drawing of every training class."""
    data = dm.load_split("train")
    images = dm.transform_images(data.images[data.offsets[:-1]])
    model.eval()
    with torch.no_grad():
        accuracy = (model.classify(images).argmax(-1) == torch.arange(data.num_classes)).float().mean().item()
    model.train()
    return accuracy


@pytest.mark.slow
def test_pretraining_learns_real_omniglot_and_its_heads_beat_an_untrained_backbone(omniglot_cache):
    """Pre-training accuracy over the 1028 characters rises; 5-way 1-shot test accuracy beats the untrained network's.

    The untrained backbone's heads are fitted the same way (about 0.55 here, like an untrained ProtoNet's).
    """
    dm = omniglot(omniglot_cache, rotations=False, test_episodes=100)
    torch.manual_seed(0)
    model = Baseline(Conv4(), head_steps=50, num_classes=1028)
    untrained = trainer().test(model, dm, verbose=False)[0]["test/acc"]
    before = pretraining_accuracy(model, dm)
    trainer(limit_train_batches=200, limit_val_batches=0).fit(model, dm)
    after = pretraining_accuracy(model, dm)
    assert after > before + 0.01 and after > 10 / 1028, (before, after)  # chance is 1 / 1028
    trained = trainer().test(model, dm, verbose=False)[0]["test/acc"]
    assert trained > untrained + 0.1, (untrained, trained)


def test_evaluation_episodes_are_protonets(omniglot_cache, tmp_path, monkeypatch):
    """The same data settings give the baselines exactly the validation and test batches ProtoNet gets."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.root", omniglot_cache["root"], "--data.cache_dir", omniglot_cache["cache_dir"]]
    data += ["--data.val_episodes", "6", "--data.test_episodes", "5", "--data.tasks_per_batch", "2"]
    modules = {}
    for config in ("protonet/omniglot_5w1s.yaml", "baseline/omniglot_5w1s.yaml", "rfs/omniglot_5w1s.yaml"):
        cli = make_cli(["--config", str(REPO / "configs" / config), *data, "--trainer.logger", "false"], run=False)
        cli.datamodule.setup("fit")
        cli.datamodule.setup("test")
        modules[config] = cli.datamodule
    reference = modules.pop("protonet/omniglot_5w1s.yaml")
    assert reference.train_batches == "episodes"
    for dm in modules.values():
        assert dm.train_batches == "labelled"
        for split in ("val_dataloader", "test_dataloader"):
            for a, b in zip(getattr(reference, split)(), getattr(dm, split)(), strict=True):
                assert a.ways == b.ways and all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))


def test_labelled_batches_cover_every_training_class_in_disjoint_ddp_shards(omniglot_cache, monkeypatch):
    shards = []
    for rank in range(2):
        dm = omniglot(omniglot_cache, batch_size=1000)
        monkeypatch.setattr(dm, "_rank_and_world", lambda rank=rank: (rank, 2))
        dm.setup("fit")
        labels = torch.cat([b.labels for b in dm.train_dataloader()])
        shards.append(labels)
    assert dm.num_train_classes == 4112  # 1028 characters x 4 rotations
    both = torch.cat(shards)
    assert set(both.tolist()) == set(range(4112))
    assert len(shards[0]) == len(shards[1]) == 41000  # 82240 images: 41120 a rank, in full batches of 1000
    # The sampler's indices are disjoint, and the labels follow them: per class, at most its 20 images in all.
    assert int(torch.bincount(both, minlength=4112).max()) <= 20


def fake_batch(fake_omniglot, tmp_path, tasks: int = 2) -> EpisodeBatch:
    dm = Omniglot(root=str(fake_omniglot), cache_dir=str(tmp_path), ways=3, shots=2, queries=2, val_episodes=tasks,
                  tasks_per_batch=tasks)  # fmt: skip
    dm.setup("validate")
    return dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)


def test_finetuning_changes_the_backbone_per_episode_and_restores_it(fake_omniglot, tmp_path):
    batch = fake_batch(fake_omniglot, tmp_path)
    torch.manual_seed(0)
    model = Baseline(Conv4(), head_steps=10, finetune_backbone=True, finetune_steps=3, finetune_lr=0.1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # as in evaluation; fine-tuning enables gradients itself
        tuned = model.episode_logits(batch)
        model.finetune_backbone = False
        frozen = model.episode_logits(batch)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert not torch.allclose(tuned, frozen)
    support = model.embed(batch.support_x.flatten(0, 1)).view(2, 6, -1)
    head = model.fit_episode_head(support, batch.support_y, 3)
    weights = [model.finetune_episode(batch.support_x[t], batch.support_y[t], [h[t : t + 1] for h in head])[0]
               for t in range(2)]  # fmt: skip
    name = "layers.0.weight" if "layers.0.weight" in weights[0] else next(iter(weights[0]))
    original = dict(model.backbone.named_parameters())[name]
    assert not torch.equal(weights[0][name], original) and not torch.equal(weights[0][name], weights[1][name])


def test_distillation_loss_is_hand_computed_kd():
    """Tian et al. 2020, section 3.3, with Hinton et al.'s T^2: KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    model = RFS(Conv4(), num_classes=3, distill_alpha=0.25, distill_temperature=2.0)
    p = [[torch.tensor(row) / 2.0 for row in logits.tolist()] for logits in (teacher, student)]
    expected = 0.0
    for t_row, s_row in zip(*p, strict=True):
        pt, log_pt, log_ps = t_row.softmax(0), t_row.log_softmax(0), s_row.log_softmax(0)
        expected += float((pt * (log_pt - log_ps)).sum())
    expected = expected / 2 * 2.0**2
    assert model.distillation_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)

    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([0, 2])
    model.teacher = RFS(Conv4(), num_classes=3).eval()
    logits = model.classify(images)
    with torch.no_grad():
        teacher_logits = model.teacher.classify(images)
    want = 0.75 * F.cross_entropy(logits, labels) + 0.25 * model.distillation_loss(logits, teacher_logits)
    torch.testing.assert_close(model.pretraining_loss(logits, LabelledBatch(images, labels)), want)
    assert not any(k.startswith("teacher.") for k in model.state_dict())  # the teacher is not checkpointed


def test_born_again_generation_distils_from_a_checkpoint(fake_omniglot, tmp_path):
    def data():
        return Omniglot(root=str(fake_omniglot), cache_dir=str(tmp_path), ways=2, queries=3, val_episodes=2,
                        test_episodes=2, train_batches="labelled", batch_size=8)  # fmt: skip

    torch.manual_seed(0)
    first = RFS(Conv4(), head_steps=5, num_classes=data().num_train_classes)
    fit = trainer(max_steps=2)
    fit.fit(first, data())
    path = tmp_path / "gen0.ckpt"
    fit.save_checkpoint(path)
    second = RFS(Conv4(), head_steps=5, teacher=str(path), num_classes=data().num_train_classes)
    trainer(max_steps=2).fit(second, data())
    assert second.teacher is not None and not second.teacher.training
    teacher_weights = dict(second.teacher.named_parameters())
    for name, value in first.state_dict().items():
        if name in teacher_weights:
            assert torch.equal(value, teacher_weights[name])  # frozen: the teacher never trained
    loaded = load_checkpoint(path, backbone=Conv4())
    assert isinstance(loaded, RFS) and loaded.classifier.out_features == data().num_train_classes


def test_logistic_regression_reaches_the_optimum():
    """RFS's head minimises sum(CE) + |W|^2 / (2C): its gradient vanishes at the fitted weights."""
    torch.manual_seed(0)
    model = RFS(Conv4(), logistic_c=1.0)
    support = F.normalize(torch.randn(3, 10, 16, dtype=torch.float64), dim=-1)
    labels = torch.arange(5).repeat_interleave(2).expand(3, 10)
    head = [t.requires_grad_() for t in model.fit_episode_head(support, labels, 5)]
    grads = torch.autograd.grad(model.episode_head_loss(head, support, labels), head)
    assert max(g.abs().max().item() for g in grads) < 1e-4


@pytest.mark.parametrize("cls", [Baseline, BaselinePlusPlus, RFS])
def test_episode_batches_are_a_clear_error(cls, fake_omniglot, tmp_path):
    dm = Omniglot(root=str(fake_omniglot), cache_dir=str(tmp_path), ways=2, queries=3)
    with pytest.raises(ValueError, match=r"set the datamodule's train_batches to 'labelled'"):
        trainer(max_steps=1).fit(cls(Conv4()), dm)
    with pytest.raises(ValueError, match=r"train_batches to 'labelled'"):
        cls(Conv4(), num_classes=3).training_step(fake_batch(fake_omniglot, tmp_path), 0)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="has a head of its own"):
        Baseline(Conv4(out_features=5))
    with pytest.raises(ValueError, match="head_steps=0"):
        Baseline(head_steps=0)
    with pytest.raises(ValueError, match="scale=0"):
        BaselinePlusPlus(scale=0)
    with pytest.raises(ValueError, match="distill_alpha=2"):
        RFS(distill_alpha=2)
    model = ProtoNet()  # an episodic module is unaffected by any of this
    assert not hasattr(model, "classifier")
