"""Language models: training each kind on a tiny project, resuming a cancelled training, bringing folders of each
kind (tiny random transformers models saved in tmp_path), refusals, and the labeler input providers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import labelers.base as lb
from app.engine.extract import ExtractJob, ExtractOptions
from app.engine.inputs import InputOptions, missing_inputs, unavailable_methods
from app.engine.labeling import LabelJob
from app.errors import JobError, ModelLoadError
from app.jobs import Cancelled, JobProgress
from app.language.registry import add_folder, list_models
from app.language.tokenizer import train_tokenizer
from app.language.train import VISION_TOWERS, TrainJob, TrainOptions, read_card
from app.project.store import Project
from labelers import textmodels

TINY = dict(steps=3, batch_size=8, image_size=16, hidden=32, layers=1, vocab_size=200, device="cpu")
TEXTS = ["a red square", "a blue square", "red", "blue", "square", "a red square on grey", "blue squares"]


@pytest.fixture
def extracted(tiny_project):
    ExtractJob(tiny_project, ExtractOptions(layers=["conv1"], batch_size=8, num_workers=0,
                                            device="cpu")).execute(JobProgress())
    return tiny_project


@pytest.mark.parametrize("kind", ["clip", "captioner", "lm"])
def test_training_stores_a_loadable_folder_with_a_card(tiny_project, kind):
    rep = TrainJob(tiny_project, TrainOptions(kind=kind, **TINY)).execute(JobProgress())
    folder = Path(rep.path)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "card.json"):
        assert (folder / f).exists(), f
    card = read_card(folder)
    assert card["steps"] == 3 and [p[0] for p in card["loss_curve"]] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(p[1])) for p in card["loss_curve"])
    assert card["data"]["captions"] > 0 and card["data"]["regions"] > 0  # the tiny COCO set has both
    assert set(card["heldout"]) >= set(card["baselines"])
    tm = textmodels.load(folder, kind)
    if kind == "captioner":
        assert tm.set_conditioned and json.loads((folder / "config.json").read_text())["neuron_studio_set_captioner"]
        assert "descriptions_seen" in card
    with Project.open(tiny_project) as p:
        rows = p.language_models(kind)
        assert [r["name"] for r in rows] == [rep.name] and rows[0]["source"] == "trained"
        assert not Path(rows[0]["path"]).is_absolute()  # inside the project: stored relative, the project can move
        assert p.run(rep_run := p.runs("train_language")[0].id).status == "done" and rep_run
        assert not (p.language_dir() / ".work").exists() or not any((p.language_dir() / ".work").iterdir())


@pytest.mark.parametrize("kind,tower", [(k, t) for k, towers in VISION_TOWERS.items() for t in towers])
def test_every_image_tower_trains_with_its_warm_up_and_auxiliary_head(tiny_project, kind, tower):
    rep = TrainJob(tiny_project, TrainOptions(kind=kind, vision=tower, **{**TINY, "steps": 4})).execute(
        JobProgress())
    card = read_card(Path(rep.path))
    assert card["image_tower"] == tower and len(card["loss_curve"]) == 4 and card["tower_warmup_steps"] == 2
    assert all(torch.isfinite(torch.tensor(p[1])) for p in card["loss_curve"])


def test_cancelled_training_resumes_from_its_checkpoint(tiny_project):
    opts = TrainOptions(kind="lm", **{**TINY, "steps": 6}, checkpoint_seconds=0.0)
    progress = JobProgress()

    def stop_at_3(info):
        if info.message.startswith("step 3/"):
            progress.cancel()

    progress.listeners.append(stop_at_3)
    progress.min_interval = 0.0
    with pytest.raises(Cancelled):
        TrainJob(tiny_project, opts).execute(progress)
    with Project.open(tiny_project) as p:
        run = p.runs("train_language")[0]
        assert run.status == "cancelled" and p.language_models() == []
    seen: list[str] = []
    again = JobProgress(min_interval=0.0)
    again.listeners.append(lambda info: seen.append(info.message))
    rep = TrainJob(tiny_project, opts).execute(again)
    steps = [m for m in seen if m.startswith("step ")]
    first = int(steps[0].split()[1].split("/")[0])
    assert 3 < first <= 6  # continued after the last checkpoint (the step the cancel was noticed at), not from 1
    assert [p[0] for p in read_card(Path(rep.path))["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    with Project.open(tiny_project) as p:
        assert [r.status for r in p.runs("train_language")] == ["done"]  # the same run, finished


def test_a_sentence_encoder_cannot_be_trained(tiny_project):
    with pytest.raises(JobError, match="language add"):
        TrainJob(tiny_project, TrainOptions(kind="sentence"))


# ---- brought folders ---------------------------------------------------------------------------------------------
def _tokenizer(folder: Path):
    tok = train_tokenizer(TEXTS * 3, 200, 16)
    tok.save_pretrained(str(folder))
    return tok


@pytest.mark.parametrize("kind,tower", [(k, t) for k, towers in VISION_TOWERS.items() for t in towers])
def test_every_image_tower_is_a_regular_folder_that_loads_and_encodes(tmp_path, kind, tower):
    from app.language.train import build_model, image_processor

    tok = _tokenizer(tmp_path)
    # 32 pixels: every tower gives several tokens (a convolutional one a 2 x 2 map)
    build_model(kind, len(tok), TrainOptions(kind=kind, image_size=32, hidden=32, layers=1, max_text_tokens=16,
                                             vision=tower)).save_pretrained(str(tmp_path))
    image_processor(32).save_pretrained(str(tmp_path))
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    tm = textmodels.load(tmp_path, kind)
    pixels = textmodels.normalize_pixels(tm, torch.rand(2, 3, 3, 32, 32))
    with torch.no_grad():
        if kind == "clip":
            out = tm.model.get_image_features(pixel_values=pixels[:, 0])
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
            assert feats.shape == (2, 32)  # one projected vector per image
        else:
            enc = textmodels.encode_exemplar_sets(tm, pixels)
            assert enc.last_hidden_state.shape[0] == 2 and enc.last_hidden_state.shape[1] % 3 == 0
            assert enc.last_hidden_state.shape[1] > 3  # several tokens per picture
            assert textmodels.text_log_likelihood(tm, ["red squares", "blue"], enc).shape == (2,)
            one = textmodels.encode_exemplar_sets(tm, pixels[:, :1])  # a set of one picture, as for a caption
            assert textmodels.text_log_likelihood(tm, ["red squares", "blue"], one).shape == (2,)


def make_clip(folder: Path) -> Path:
    import transformers as tf

    from app.language.train import image_processor

    tok = _tokenizer(folder)
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=8)
    tf.CLIPModel(cfg).save_pretrained(str(folder))
    image_processor(16).save_pretrained(str(folder))
    return folder


def make_captioner(folder: Path) -> Path:
    from app.language.train import build_model, image_processor

    tok = _tokenizer(folder)
    model = build_model("captioner", len(tok), TrainOptions(kind="captioner", image_size=16, hidden=32, layers=1,
                                                             max_text_tokens=16, vision="vit"))
    model.save_pretrained(str(folder))
    image_processor(16).save_pretrained(str(folder))
    return folder


def make_lm(folder: Path) -> Path:
    import transformers as tf

    tok = _tokenizer(folder)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
                                     n_positions=16)).save_pretrained(str(folder))
    return folder


def make_sentence(folder: Path) -> Path:
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "square", "on", "grey"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tf.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    tf.BertModel(tf.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32)).save_pretrained(str(folder))
    return folder


MAKERS = {"clip": make_clip, "captioner": make_captioner, "lm": make_lm, "sentence": make_sentence}


def test_brought_folders_of_each_kind_are_added_provided_and_used(extracted, tmp_path):
    torch.manual_seed(0)
    with Project.open(extracted) as p:
        layer = p.layer(p.model()["id"], "conv1")
        missing = missing_inputs(p, layer, (lb.Input.CLIP_MODEL, lb.Input.CAPTIONER, lb.Input.CAUSAL_LM))
        assert set(missing) == {lb.Input.CLIP_MODEL, lb.Input.CAPTIONER, lb.Input.CAUSAL_LM}
        assert "language train PROJECT --kind captioner" in missing[lb.Input.CAPTIONER]
        assert "clip_dissect" in unavailable_methods(p, p.model()["id"])["conv1"]
        for kind, make in MAKERS.items():
            info = add_folder(p, make(tmp_path / f"brought-{kind}"), kind)
            assert info.source == "added" and info.in_use and info.path.is_absolute()
        assert {m.kind for m in list_models(p)} == set(MAKERS)
        assert missing_inputs(p, layer, tuple(lb.Input)).keys() <= {lb.Input.TRANSLATOR}  # TExplain trains it
        assert "clip_dissect" not in unavailable_methods(p, p.model()["id"])["conv1"]

    # CLIP-Dissect with the brought dual encoder, through the provider (no --clip)
    job = LabelJob(extracted, "clip_dissect", "conv1", {"vocabulary": "dataset", "top_k_images": 5},
                   device="cpu", num_workers=0)
    rep = job.execute(JobProgress())
    assert rep.labels == 4 * 3  # 4 units, the dataset's 3 concepts
    with Project.open(extracted) as p:
        labels = p.labels(layer_id=p.layer(p.model()["id"], "conv1")["id"], method="clip_dissect")
        assert {r["label"] for r in labels} <= {"square", "red", "blue"}

    # the captioner scores exemplar sets, the LM scores texts, the sentence encoder embeds
    cap = textmodels.load(tmp_path / "brought-captioner", "captioner")
    images = torch.rand(2, 3, 3, 16, 16)
    masks = torch.rand(2, 3, 16, 16) > 0.5
    enc = textmodels.encode_exemplar_sets(cap, textmodels.normalize_pixels(cap, textmodels.mask_pixels(images, masks)))
    assert enc.last_hidden_state.shape[:2] == (2, 3 * 5)  # k * (4 patches + CLS)
    ll = textmodels.text_log_likelihood(cap, ["red squares", "blue squares"], enc)
    assert ll.shape == (2,) and bool((ll < 0).all())
    lm = textmodels.load(tmp_path / "brought-lm", "lm")
    ll = textmodels.text_log_likelihood(lm, ["a red square", "square"])
    n = textmodels.token_counts(lm, ["a red square", "square"])
    assert bool((ll < 0).all()) and n[0] > n[1]
    sent = textmodels.load(tmp_path / "brought-sentence", "sentence")
    out = sent.model(**sent.tokenizer(["a red square"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 16


def test_clip_flag_still_overrides_the_projects_encoder(extracted, tmp_path):
    folder = make_clip(tmp_path / "given-clip")
    with Project.open(extracted) as p:
        layer = p.layer(p.model()["id"], "conv1")
        assert missing_inputs(p, layer, (lb.Input.CLIP_MODEL,), InputOptions(clip_model=folder)) == {}
    rep = LabelJob(extracted, "clip_dissect", "conv1", {"vocabulary": "dataset", "top_k_images": 5},
                   clip_model=folder, device="cpu", num_workers=0).execute(JobProgress())
    assert rep.labels == 12


def test_refusals_name_the_folder_and_the_fix_and_write_nothing(extracted, tmp_path):
    lm = make_lm(tmp_path / "lm")
    with Project.open(extracted) as p:
        with pytest.raises(ModelLoadError, match="does not exist.*language train"):
            add_folder(p, tmp_path / "nowhere", "lm")
        with pytest.raises(ModelLoadError, match="'gpt2', not a clip model"):
            add_folder(p, lm, "clip")
        remote = tmp_path / "remote"
        remote.mkdir()
        cfg = json.loads((lm / "config.json").read_text())
        (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
        with pytest.raises(ModelLoadError, match="own Python code"):
            add_folder(p, remote, "lm")
        notok = tmp_path / "notok"
        notok.mkdir()
        for f in ("config.json", "model.safetensors"):
            (notok / f).write_bytes((lm / f).read_bytes())
        with pytest.raises(ModelLoadError, match=f"{notok}.*no tokenizer files.*save_pretrained"):
            add_folder(p, notok, "lm")
        noproc = make_clip(tmp_path / "clip")
        (noproc / "preprocessor_config.json").unlink()
        with pytest.raises(ModelLoadError, match="no image processor"):
            add_folder(p, noproc, "clip")
        assert p.language_models() == []


def test_cli_language_list_add_and_refusal(extracted, tmp_path, capsys):
    from app.cli import main

    assert main(["language", "list", str(extracted)]) == 0
    assert "no language models" in capsys.readouterr().out
    assert main(["language", "add", str(extracted), str(tmp_path / "missing"), "--kind", "lm"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["language", "add", str(extracted), str(make_lm(tmp_path / "lm")), "--kind", "lm",
                 "--name", "mine"]) == 0
    assert main(["language", "list", str(extracted)]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "added" in out


def test_captioner_learns_unit_descriptions_and_records_which(extracted):
    with Project.open(extracted) as p:
        who = p.annotator("alice")
        for uid, text in zip(p.unit_ids(p.layer(p.model()["id"], "conv1")["id"]),
                             ["red squares", "blue squares", "squares", "grey background"]):
            p.set_annotation(annotator_id=who, unit_id=uid, kind="description", text=text)
    rep = TrainJob(extracted, TrainOptions(kind="captioner", **{**TINY, "steps": 12})).execute(JobProgress())
    card = read_card(Path(rep.path))
    assert card["data"]["descriptions"] == 4
    seen, held = card["descriptions_seen"], card["descriptions_heldout"]
    assert sorted(seen + held) == [f"tiny/conv1/{u}" for u in range(4)] and not set(seen) & set(held)
    assert card["data"]["heldout_descriptions"] == len(held)


def _two_objects(phrase_of_region: list[int], **extra):
    """A corpus of two 8 x 8 images: in image 0 one object named "red", "circle" and "red circle" (same pixels), in
    image 1 a "blue" object elsewhere; `phrase_of_region` lists each region's phrase (0-2: image 0, 3: image 1)."""
    from app.language.data import Corpus

    a = torch.zeros(8, 8, dtype=torch.bool)
    a[1:5, 1:5] = True
    b = torch.zeros(8, 8, dtype=torch.bool)
    b[4:8, 4:8] = True
    phrases = ["red", "circle", "red circle", "blue"]
    return Corpus(image_size=8, dataset="t", images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                  heldout=torch.tensor([False, False]),
                  region_image=torch.tensor([int(p == 3) for p in phrase_of_region]),
                  region_phrase=torch.tensor(phrase_of_region),
                  region_masks=torch.stack([b if p == 3 else a for p in phrase_of_region]), phrases=phrases, **extra)


def test_dual_encoder_targets_a_region_to_every_name_of_its_pixels():
    from app.language.tokenizer import train_tokenizer
    from app.language.train import Batches

    corpus = _two_objects([0, 1, 2, 3])
    phrases = corpus.phrases
    tok = train_tokenizer(phrases * 4, 100, 8)
    batches = Batches("clip", corpus, tok, TrainOptions(kind="clip", image_size=8, max_text_tokens=8), 12)
    assert batches.same_pixels == [frozenset(phrases[:3])] * 3 + [frozenset({"blue"})]
    drawn = batches.draw(0)
    texts = [x.strip() for x in tok.batch_decode(drawn["ids"], skip_special_tokens=True)]
    t = drawn["targets"]
    for i, ti in enumerate(texts):  # every row is a region: its text says which object it is
        for j, tj in enumerate(texts):
            assert bool(t[i, j]) == ((ti == "blue") == (tj == "blue")), (ti, tj)


def test_captioner_region_sets_carry_every_concept_word_of_their_pixels():
    from app.language.tokenizer import train_tokenizer
    from app.language.train import Batches

    corpus = _two_objects([0, 1, 2, 2, 3, 3], captions=[(0, "a red circle"), (1, "a blue thing")])
    phrases = corpus.phrases
    corpus.concept_names = ["red", "circle", "blue"]
    corpus.presence = torch.tensor([[True, True, False], [False, False, True]])
    tok = train_tokenizer(phrases * 4 + ["a red circle", "a blue thing"], 100, 16)
    batches = Batches("captioner", corpus, tok, TrainOptions(kind="captioner", image_size=8, max_text_tokens=16), 8)
    assert batches.aux_words == 3
    assert batches.region_words.tolist() == [[1, 1, 0]] * 4 + [[0, 0, 1]] * 2
    kinds = set()
    for step in range(12):
        d = batches.draw(step)
        texts = [x.strip() for x in tok.batch_decode(d["ids"], skip_special_tokens=True)]
        k = d["pixels"].shape[1]
        assert d["aux"].shape == (len(texts), k, 3)
        for text, aux in zip(texts, d["aux"]):
            kinds.add("caption" if text.startswith("a ") else "regions")
            want = [0, 0, 1] if "blue" in text else [1, 1, 0]  # a set's regions, or a captioned image's concepts
            assert aux.tolist() == [want] * k, (text, aux)
    assert kinds == {"caption", "regions"}
    # with a warm-up, the first steps are single region pictures with their words and no text
    corpus.concept_categories = ["color", "object", "color"]
    warm = Batches("captioner", corpus, tok, TrainOptions(kind="captioner", image_size=8, max_text_tokens=16), 8,
                   warmup=2)
    first = warm.draw(0)
    assert "ids" not in first and first["pixels"].shape == (8, 1, 3, 8, 8) and first["aux"].shape == (8, 1, 3)
    assert "ids" in warm.draw(2)
    assert [g.tolist() for g in warm.concept_groups] == [[0, 2], [1]]
    # the dual encoder's pictures carry the same targets: captions and words their image's, regions their own
    clip = Batches("clip", corpus, tok, TrainOptions(kind="clip", image_size=8, max_text_tokens=16), 9)
    d = clip.draw(0)
    texts = [x.strip() for x in tok.batch_decode(d["ids"], skip_special_tokens=True)]
    assert d["aux"].shape == (len(texts), 1, 3)
    for text, aux in zip(texts, d["aux"][:, 0].tolist()):
        assert aux == ([0, 0, 1] if "blue" in text else [1, 1, 0]), (text, aux)


def test_concept_loss_is_a_cross_entropy_within_each_category():
    from app.language.train import concept_loss

    groups = [torch.tensor([0, 2]), torch.tensor([1, 3])]  # colours 0, 2; shapes 1, 3
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    # a red (0) circle (1): one term per category
    want = -(torch.log_softmax(torch.tensor([2.0, -1.0]), 0)[0] + torch.log_softmax(torch.tensor([0.0, 1.0]), 0)[0])
    assert torch.isclose(concept_loss(logits, torch.tensor([[1.0, 1.0, 0.0, 0.0]]), groups), want)
    # a picture named by no shape word adds no shape term; two naming words share the target
    only = -torch.log_softmax(torch.tensor([2.0, -1.0]), 0).mean()
    assert torch.isclose(concept_loss(logits, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), groups), only)


def test_unit_like_masks_are_coarse_blobs_around_the_concept():
    from app.language.train import UNIT_LIKE_SHARE, unit_like_masks

    m = torch.zeros(100, 32, 32, dtype=torch.bool)
    m[:, 7:19, 9:21] = True  # off every grid's cell boundaries, so each coarsening changes it
    outs = [unit_like_masks(m, torch.Generator().manual_seed(seed)) for seed in range(6)]  # each seed: one grid
    changed = torch.stack([(o != m).flatten(1).any(1) for o in outs])
    assert abs(float(changed.float().mean()) - UNIT_LIKE_SHARE) < 0.1
    blobs = torch.cat(outs)[changed.flatten()]
    # every blob lies on the concept, and none reaches the far corner
    assert bool((blobs & m[:1]).flatten(1).any(1).all()) and not bool(blobs[:, 31, 0].any())
    tiny = torch.zeros(50, 32, 32, dtype=torch.bool)
    tiny[:, 0, 0] = True  # too small to survive coarsening: kept as it is
    assert torch.equal(unit_like_masks(tiny, torch.Generator().manual_seed(1)), tiny)


def test_cancelled_captioner_training_resumes_with_its_auxiliary_head(tiny_project):
    opts = TrainOptions(kind="captioner", **{**TINY, "steps": 5}, checkpoint_seconds=0.0)
    progress = JobProgress(min_interval=0.0)
    progress.listeners.append(lambda info: progress.cancel() if info.message.startswith("step 2/") else None)
    with pytest.raises(Cancelled):
        TrainJob(tiny_project, opts).execute(progress)
    with Project.open(tiny_project) as p:
        heads = list((p.language_dir() / ".work").glob("*/aux_head.safetensors"))
    assert len(heads) == 1  # the head is checkpointed beside the model
    rep = TrainJob(tiny_project, opts).execute(JobProgress())
    folder = Path(rep.path)
    assert [p[0] for p in read_card(folder)["loss_curve"]] == [1, 2, 3, 4, 5]
    # the stored captioner is a regular VisionEncoderDecoderModel: the head was for training only
    from safetensors.torch import load_file

    assert not any("aux" in k for k in load_file(str(folder / "model.safetensors")))
