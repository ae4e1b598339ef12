"""The embedded demo runs end to end; config files and overrides resolve to typed values."""
import dataclasses
import typing
from pathlib import Path

import jax
import numpy as np
import pytest

from mmjax import configlib, demo
from mmjax.errors import ConfigError
from mmjax.models import presets
from mmjax.models.config import RuntimeConfig
from mmjax.sharding import mesh_rules
from mmjax.training import model_spec
from mmjax.training.config import from_config, reference_markdown, validate
from mmjax.training.init import initial_params
from mmjax.training.run import StepSetup

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_demo_runs_sharded_and_matches_single_device():
    stats = demo.forward_demo(["--config.mesh.tensor=2"])
    assert stats["logits_shape"][0] == 4 and stats["logits_shape"][2] == 512
    assert stats["sharded_vs_unsharded_max_abs_diff"] < 1e-5


def test_config_variants_and_overrides():
    cfg = configlib.load(f"{CONFIGS / 'model.py'}:llava15_7b_gpu",
                         ["--config.mesh.fsdp=8", "--config.runtime.scan_layers=False"])
    assert configlib.typed(RuntimeConfig, cfg.runtime) == RuntimeConfig(
        dtype="bfloat16", attention_impl="cudnn", remat_policy="save_qkv_context",
        scan_layers=False)
    assert cfg.mesh.fsdp == 8
    assert presets.get(cfg.model).image_tokens == 576
    rules = configlib.tuples(cfg.logical_axis_rules)
    assert ("embed", "fsdp") in rules and ("activation_batch", ("data", "fsdp")) in rules


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown config field 'runtime.nope'; valid: "
                                          "attention_impl, dtype"):
        configlib.load(str(CONFIGS / "model.py"), ["--config.runtime.nope=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        configlib.load("configs/missing.py")
    with pytest.raises(ConfigError, match="unknown model preset 'llava99'"):
        presets.get(configlib.load(f"{CONFIGS / 'model.py'}:llava99").model)
    with pytest.raises(ConfigError, match="no variant 'nosuch'; variants: auto, llava15_7b"):
        configlib.load(f"{CONFIGS / 'stage1.py'}:nosuch")
    with pytest.raises(ConfigError, match="batch_size: 1.5 has the wrong type"):
        configlib.load(str(CONFIGS / "stage1.py"), ["--config.batch_size=1.5"])
    c = configlib.load(str(CONFIGS / "stage1.py"))
    c.data.sources = [{"kind": "llava_json", "pth": "x.json"}]
    with pytest.raises(ConfigError, match=r"unknown field\(s\) data.sources\[0\].pth; valid: "
                                          "kind, path"):
        from_config(c)
    c.data.sources = [{"path": "x.json"}]
    with pytest.raises(ConfigError, match=r"data.sources\[0\].kind must be set"):
        from_config(c)
    c = configlib.load(str(CONFIGS / "stage1.py"), ["--config.data.packing='pad'"])
    c.runtime.attention_impl = "flash"
    with pytest.raises(ConfigError, match="runtime.attention_impl is 'flash'; one of"):
        from_config(c)


def _sections(cls, prefix=""):
    """(dotted name, dataclass) of TrainConfig and every nested section, sources included."""
    import dataclasses
    import typing

    from mmjax.data.pipeline import SourceConfig

    yield prefix, cls
    for f in configlib.settable_fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{prefix}{f.name}.")
    if cls.__name__ == "DataConfig":
        yield f"{prefix}sources[].", SourceConfig


@pytest.mark.parametrize("spec", ["stage1.py", "stage1.py:demo", "stage2.py:llava_1b_lora",
                                  "stage2.py:siglip_qwen2_7b", "stage2.py:demo"])
def test_every_typed_field_is_a_config_field_and_back(spec):
    """No field of any typed config is missing from the config file, none is extra, and each
    one is settable from the command line and reaches the typed config."""
    from mmjax.training.config import TrainConfig

    c = configlib.load(f"{CONFIGS / spec}")
    for prefix, cls in _sections(TrainConfig):
        if prefix.endswith("[]."):
            continue  # list entries: checked by typed() on use (test above)
        node = c
        for key in filter(None, prefix.rstrip(".").split(".")):
            node = node[key]
        fields = {f.name for f in configlib.settable_fields(cls)}
        assert set(node.keys()) == fields, (prefix, set(node.keys()) ^ fields)
    tc = from_config(c)
    assert tc.logical_axis_rules and tc.data.template
    # fields the old hand translation dropped now reach the typed config from the CLI
    tc = from_config(configlib.load(f"{CONFIGS / spec}", [
        "--config.data.group_by_length=True", "--config.data.length_buckets=(512, 1024)",
        "--config.data.pack_window=64", "--config.data.seq_len=4096",
        "--config.data.shuffle=False", "--config.data.tfds_data_dir=/data/tfds",
        "--config.optim.b2=0.95", "--config.checkpoint.keep_every=1000",
        "--config.profile.num_steps=3", "--config.lora.rank=8"]))
    assert tc.data.group_by_length and tc.data.length_buckets == (512, 1024)
    assert (tc.data.pack_window, tc.data.seq_len, tc.data.shuffle) == (64, 4096, False)
    assert tc.data.tfds_data_dir == "/data/tfds" and tc.optim.b2 == 0.95
    assert tc.checkpoint.keep_every == 1000 and tc.profile.num_steps == 3
    assert tc.lora.rank == 8 and tc.model_runtime.lora_rank == (8 if tc.lora.enabled else 0)


def test_every_config_field_is_documented_and_the_readme_reference_is_current():
    from mmjax.training.config import TrainConfig

    for prefix, cls in _sections(TrainConfig):
        docs = configlib.field_docs(cls)
        undocumented = [f.name for f in configlib.settable_fields(cls) if f.name not in docs
                        and not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
        assert not undocumented, (prefix, undocumented)
    readme = (CONFIGS.parent / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert start in readme and end in readme
    block = readme[readme.index(start) + len(start):readme.index(end)]
    assert block.strip() == reference_markdown().strip(), (
        "README's configuration reference is stale: python -m mmjax.training.config")


def test_demo_data_holds_out_phrasings_and_has_the_ablation_twin(tmp_path):
    """No held-out phrasing appears in the training conversations; the ablation's file is the
    same conversations with the format prompt stripped; short answers are one word,
    conversational ones full sentences."""
    import json

    from mmjax.data import synthetic as syn
    from mmjax.evaluation import scoring

    p = syn.write_split(tmp_path, "train", 120, 28, seed=1)
    main = json.loads(p["instruct"].read_text())
    ablation = json.loads(p["instruct_noprompt"].read_text())
    asked = [t["value"].removeprefix("<image>\n") for r in main for t in r["conversations"]
             if t["from"] == "human"]
    held = {q for qs in syn.HELD_OUT.values() for q in qs}
    assert not any(q.split("\n")[0] in held for q in asked)
    assert {q.split("\n")[0] for q in asked} == {q for qs in syn.SEEN.values() for q in qs}
    for a, b in zip(main, ablation):
        for ta, tb in zip(a["conversations"], b["conversations"], strict=True):
            assert ta["value"].replace(f"\n{syn.SHORT}", "") == tb["value"]
    turns = [t for r in main for t in r["conversations"]]
    replies = [(q["value"], a["value"]) for q, a in zip(turns[::2], turns[1::2])]
    assert all(scoring.is_short(a) for q, a in replies if q.endswith(syn.SHORT))
    assert all(scoring.is_sentence(a) for q, a in replies if not q.endswith(syn.SHORT))
    short = sum(q.endswith(syn.SHORT) for q, _ in replies)
    assert 0.5 < short / len(replies) < 0.8  # short answers are the majority, as in LLaVA
    held_q = json.loads(p["qa_heldout"].read_text())
    assert all(q["question"].split("\n")[0] in held for q in held_q)
    conv = json.loads(p["conv"].read_text())
    assert {c["kind"] for c in conv} == {f"{k}/{s}" for k in syn.PHRASINGS
                                         for s in ("seen", "heldout")}
    # stage 1's captions: every wording used, each naming all four facts of its picture
    captions = [r["conversations"][1]["value"] for r in json.loads(p["captions"].read_text())]
    qa = {}
    for q in json.loads(p["qa"].read_text()):
        qa.setdefault(q["image"], {})[q["kind"]] = q["answer"]
    images = [r["image"] for r in json.loads(p["captions"].read_text())]
    for text, image in zip(captions, images, strict=True):
        assert all(qa[image][k] in text.lower() for k in syn.SHORT_KINDS), text
    wordings = {next(i for i in range(len(syn.CAPTIONS)) if text == syn.caption(qa[image], i))
                for text, image in zip(captions, images)}
    assert wordings == set(range(len(syn.CAPTIONS)))


def _initial_params(stage: int, run: str, data: Path, workdir: Path):
    tc = from_config(demo.stage_config(stage, workdir, data, [], run))
    validate(tc)
    mesh = tc.make_mesh()
    tc = tc.for_mesh(mesh)
    spec = model_spec.resolve(tc)
    setup = StepSetup.of(tc, spec.cfg, mesh, 1)
    with mesh_rules(mesh, tc.logical_axis_rules):
        params = initial_params(setup.model, tc.init, setup.abstract_params, setup.param_sh,
                                setup.rt, mesh, tc.logical_axis_rules, tc.seed)
    return tc, jax.device_get(params)


def test_demo_without_stage1_starts_where_stage1_started(demo_data, tmp_path):
    """`--ablation stage1`: the same stage 2 (data, steps, frozen tower, evaluation) from
    exactly the parameters stage 1 starts from, untrained; and its goal line."""
    tc1, p1 = _initial_params(1, demo.MAIN, demo_data, tmp_path)
    tc2, p2 = _initial_params(2, "stage2_no_stage1", demo_data, tmp_path)
    main = from_config(demo.stage_config(2, tmp_path, demo_data, [], demo.MAIN))
    assert not tc1.init.stage1_checkpoint and not tc2.init.stage1_checkpoint
    assert main.init.stage1_checkpoint == str(tmp_path / "stage1")
    for field in ("data", "optim", "eval", "total_steps", "batch_size", "seed"):
        assert getattr(tc2, field) == getattr(main, field), field
    assert dict(tc2.optim.groups)["vision_tower/.*"] is None  # frozen, as in the main run
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(p1), jax.tree_util.tree_leaves(p2)
    assert len(flat1) == len(flat2)
    for (path, a), b in zip(flat1, flat2, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    def curve(heldout, blank):
        return [{"step": s, "val_loss": 1.0, "seen": h, "heldout": h, "blank": b}
                for s, h, b in zip((225, 450), heldout, blank)]
    main_kinds = {"per_kind": {k: {"seen": 1.0, "heldout": 1.0} for k in demo.CHANCE},
                  "seen_accuracy": 1.0, "heldout_accuracy": 1.0, "blank_accuracy": 0.35,
                  "with_prompt_short_share": 1.0, "without_prompt_sentence_share": 1.0}
    for bare, met in (((0.5, 0.79), True), ((0.5, 0.81), False)):
        par = demo.paradigm(curve((0.9, 1.0), (0.3, 0.3)), curve(bare, (0.3, 0.3)))
        assert demo.goals(main_kinds, 0.35, par=par)[-1]["met"] is met
    par = demo.paradigm(curve((0.9, 1.0), (0.3, 0.3)), curve((0.3, 0.39), (0.3, 0.3)))
    assert demo.goals(main_kinds, 0.35, par=par)[-1]["met"]  # no better than blank images
    main_kinds["per_kind"]["side"]["heldout"] = 0.89
    assert [g["goal"] for g in demo.goals(main_kinds, 0.35) if not g["met"]] == [
        "side: >= 90% seen and held-out"]


def test_closed_sets_presets_and_benchmarks_are_named_at_start(tmp_path):
    """A value outside a field's choices, an unknown preset, a benchmark's split: each is one
    ConfigError naming the choices, from the config alone (before any weight loads)."""
    from mmjax.evaluation import during_training
    from mmjax.training.config import from_file, validate

    stage1 = str(CONFIGS / "stage1.py")
    with pytest.raises(ConfigError, match="optim.schedule is 'linear'; one of 'cosine', "
                                          "'constant'"):
        from_file(stage1, ["--config.optim.schedule=linear"])
    with pytest.raises(ConfigError, match="data.packing is 'best'; one of 'pad', 'first_fit'"):
        from_file(stage1, ["--config.data.packing=best"])
    with pytest.raises(ConfigError, match="distributed.mode is 'slurm'; one of"):
        from_file(stage1, ["--config.distributed.mode=slurm"])
    with pytest.raises(ConfigError, match="stage is 3; one of 1, 2"):
        from_file(stage1, ["--config.stage=3"])
    with pytest.raises(ConfigError, match="unknown model preset 'llava99'; known: .*demo"):
        validate(from_file(stage1, ["--config.model=llava99"]))
    with pytest.raises(ConfigError, match="'tiny_clip' is a tower preset, not a LLaVA model"):
        validate(from_file(stage1, ["--config.model=tiny_clip"]))
    with pytest.raises(ConfigError, match="unknown projector 'mlp2x_relu'"):
        validate(from_file(stage1, ["--config.llava.projector=mlp2x_relu"]))
    data = tmp_path / "qa.json"
    data.write_text("[]")
    bench = [{"name": "short_answer", "data": str(data)}]
    tc = from_file(stage1, [f"--config.eval.benchmarks={bench!r}"])
    during_training.check(tc.eval)
    with pytest.raises(ConfigError, match=r"eval.benchmarks\[0\].name is 'vqa'; one of"):
        from_file(stage1, [f"--config.eval.benchmarks={[dict(bench[0], name='vqa')]!r}"])
    with pytest.raises(ConfigError, match=r"eval.benchmarks\[0\]: .*split 'nosuch'"):
        during_training.check(from_file(stage1, [
            f"--config.eval.benchmarks={[dict(bench[0], split='nosuch')]!r}"]).eval)
    with pytest.raises(ConfigError, match=r"eval.benchmarks\[0\].data: .* does not exist"):
        during_training.check(from_file(stage1, [
            f"--config.eval.benchmarks={[dict(bench[0], data=str(tmp_path / 'x'))]!r}"]).eval)
