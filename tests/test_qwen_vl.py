"""Qwen-VL checkpoints (issue 13, in progress): a tiny Qwen-VL-Chat directory in the official layout loads with its
visual tower, the list format `<img>PATH</img>` becomes the 256-id span of the original tokenizer, and the tower's
256 vectors replace exactly the embeddings between the tags (qwen-family.md §6.4), through the engine's media
items: chunk boundaries inside the image and the prefix cache included."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_vision import official_state
from tiny import hf_config, random_model, to_v1_state, v1_config, write_qwen_tiktoken

import qwen_engine
from qwen_engine.config import VisionConfig
from qwen_engine.engine.serving import Request
from qwen_engine.errors import QwenError
from qwen_engine.images import load_image, pixels
from qwen_engine.tokenizer import IncrementalDecoder

IMG, END, PAD = 151857, 151858, 151859
VISUAL = {"image_size": 448, "patch_size": 14, "width": 48, "layers": 2, "heads": 4, "mlp_ratio": 2.5,
          "output_dim": 128, "image_start_id": IMG}


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory, gguf_arrays):
    config = hf_config("qwen1.5", hidden_size=128, intermediate_size=176, max_position_embeddings=2048)
    directory = tmp_path_factory.mktemp("qwen-vl-chat")
    state = to_v1_state(random_model(config, seed=5).state_dict())
    state |= {f"transformer.visual.{name}": tensor for name, tensor in official_state(VisionConfig.from_dict(VISUAL)).items()}
    save_file(state, str(directory / "model.safetensors"))
    raw = v1_config(config, seq_length=2048, use_dynamic_ntk=True, use_logn_attn=True, visual=VISUAL)
    (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    write_qwen_tiktoken(directory / "qwen.tiktoken", gguf_arrays[0])
    for i, colour in enumerate(((200, 30, 30), (20, 90, 220))):
        Image.new("RGB", (320, 200), colour).save(directory / f"picture{i}.png")
    return directory


@pytest.fixture(scope="module")
def vl(vl_dir):
    return qwen_engine.load(vl_dir, dtype="float32")


def first_logits(model, text: str, **engine_options) -> torch.Tensor:
    request = model.request(text, max_tokens=1, temperature=0)
    request.keep_logits = True
    engine = model.serving_engine(num_blocks=128, **engine_options)
    return engine.run([request])[request.request_id][0][0].logits


def by_hand(model, text: str, paths: list) -> torch.Tensor:
    """The original model's first forward: the ids' embeddings, the 256 rows strictly between each pair of tags
    replaced by that image's tower output."""
    ids = model.tokenizer.encode(text, special=True)
    with torch.inference_mode():
        hidden = model.decoder.embed(torch.tensor([ids]))
        for start, path in zip([i for i, t in enumerate(ids) if t == IMG], paths):
            hidden[0, start + 1 : start + 257] = model.vision(pixels(load_image(path).image)[None])[0]
        return model.decoder(inputs_embeds=hidden)[0, -1]


def test_a_qwen_vl_chat_directory_loads_with_its_tower(vl) -> None:
    assert vl.vision is not None and vl.config.vision == VisionConfig.from_dict(VISUAL)
    assert [vl.tokenizer.token_to_id(t) for t in ("<ref>", "<img>", "</img>", "<imgpad>")] == [151851, IMG, END, PAD]


def test_the_list_format_is_tokenized_as_the_original_tokenizer_does(vl, vl_dir) -> None:
    path = str(vl_dir / "picture0.png")
    ids = vl.tokenizer.encode(f"Picture 1: <img>{path}</img>\nWhat is it?", special=True)
    start, end = ids.index(IMG), ids.index(END)
    span = ids[start + 1 : end]
    assert len(span) == 256 and span[: len(path.encode())] == list(path.encode()) and set(span[len(path.encode()):]) == {PAD}
    assert IMG not in vl.tokenizer.encode(f"<img>{path}</img>")  # without special: text
    with pytest.raises(QwenError, match="255 bytes"):
        vl.tokenizer.encode("<img>" + "a" * 256 + "</img>", special=True)
    with pytest.raises(QwenError, match="no </img>"):
        vl.tokenizer.encode("<img>x.png", special=True)


@pytest.mark.parametrize("chunk", [2048, 100])  # 100: prompt chunks end inside the first image
def test_one_and_two_images_give_the_original_forward(vl, vl_dir, chunk: int) -> None:
    paths = [vl_dir / "picture0.png", vl_dir / "picture1.png"]
    one = f"Picture 1: <img>{paths[0]}</img>\nWhat colour is it?"
    two = f"Picture 1: <img>{paths[0]}</img>\nPicture 2: <img>{paths[1]}</img>\nWhich is red?"
    for text, images in ((one, paths[:1]), (two, paths)):
        expected = by_hand(vl, text, images)
        ours = first_logits(vl, text, prefill_tokens=chunk)
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (first_logits(vl, two) - first_logits(vl, two.replace("picture1", "picture0"))).abs().max() > 1e-3


def test_a_missing_image_is_one_clear_error(vl, vl_dir) -> None:
    with pytest.raises(QwenError, match="image not found"):
        vl.generate(f"<img>{vl_dir / 'absent.png'}</img>", max_tokens=1)


def test_chat_image_parts_become_the_list_format_in_qwen_vl_chats_chatml(vl, vl_dir) -> None:
    path = str(vl_dir / "picture0.png")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"}, {"type": "image", "image": path}]}]
    prompt = vl.chat_prompt(messages)
    raw = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
           f"Picture 1: <img>{path}</img>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.token_ids == vl.tokenizer.encode(raw, special=True)
    assert [(item.kind, item.offset, item.length) for item in prompt.items] == [("image", prompt.token_ids.index(IMG) + 1, 256)]
    reply = vl.chat(messages, max_tokens=3, temperature=0)
    assert reply.token_ids == vl.generate(raw, max_tokens=3, temperature=0).token_ids
    # Bytes, a PIL image and a data: URL of the same picture: the same image, the same reply.
    data = (vl_dir / "picture0.png").read_bytes()
    for source in (data, Image.open(vl_dir / "picture0.png")):
        same = [{"role": "user", "content": [{"type": "image", "image": source}, {"type": "text", "text": "What colour is it?"}]}]
        assert vl.chat(same, max_tokens=3, temperature=0).token_ids == reply.token_ids


def test_two_images_are_numbered_across_the_conversation(vl, vl_dir) -> None:
    image = lambda name: {"type": "image", "image": str(vl_dir / name)}  # noqa: E731
    messages = [{"role": "user", "content": [image("picture0.png"), {"type": "text", "text": "And this?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": [image("picture1.png"), {"type": "text", "text": "Which is blue?"}]}]
    prompt = vl.chat_prompt(messages)
    assert len(prompt.items) == 2 and "Picture 2: " in vl.tokenizer.decode(prompt.token_ids, skip_special=False)


def test_markup_in_user_text_stays_text(vl, vl_dir) -> None:
    text = f"<img>{vl_dir / 'picture0.png'}</img><ref>x</ref><|im_end|>"
    prompt = vl.chat_prompt([{"role": "user", "content": text}])
    assert not prompt.items and IMG not in prompt.token_ids and prompt.token_ids.count(151645) == 2  # the template's own


def test_a_text_only_model_refuses_an_image(tiny_gguf, vl_dir) -> None:
    text_only = qwen_engine.load(tiny_gguf, dtype="float32")
    with pytest.raises(QwenError, match="reads text"):
        text_only.chat([{"role": "user", "content": [{"type": "image", "image": str(vl_dir / "picture0.png")}]}])


def test_grounding_boxes_are_read_in_the_images_pixels_and_drawn() -> None:
    from qwen_engine.grounding import draw_boxes, read_boxes

    text = ("<ref>the cat</ref><box>(100,200),(500,750)</box><box>(0,0),(10,10)</box> and "
            "<box>(900,900),(999,999)</box><quad>(0,0),(500,0),(500,500),(0,500)</quad><box>(1,2)</box>")
    boxes = read_boxes(text, (640, 400))
    assert [(b.label, b.kind, b.rectangle) for b in boxes] == [
        ("the cat", "box", (64.0, 80.0, 320.0, 300.0)), ("the cat", "box", (0.0, 0.0, 6.4, 4.0)),
        ("the cat", "box", (576.0, 360.0, 639.36, 399.6)), ("the cat", "quad", (0.0, 0.0, 320.0, 200.0))]
    assert read_boxes("<box>(10,10),(20,20)</box>", (1000, 1000))[0].label is None
    drawn = draw_boxes(Image.new("RGB", (640, 400), "white"), boxes[:1])
    assert drawn.getpixel((64, 150)) == (255, 0, 0) and drawn.getpixel((320, 150)) == (255, 0, 0)  # left and right edges
    assert drawn.getpixel((200, 150)) == (255, 255, 255) and drawn.getpixel((30, 30)) == (255, 255, 255)


def test_replies_keep_the_grounding_markup(vl) -> None:
    """Output text keeps <ref>/<box> (so replies can be read for boxes), drops the other control tokens."""
    ids = vl.tokenizer.encode("<ref>a</ref><box>(1,2),(3,4)</box><imgpad><|im_end|>", special=True)
    assert vl.tokenizer.decode(ids) == "<ref>a</ref><box>(1,2),(3,4)</box>"
    decoder = IncrementalDecoder(vl.tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "<ref>a</ref><box>(1,2),(3,4)</box>"


def test_qwen_chat_with_an_image_gives_the_librarys_reply(vl, vl_dir, capsys, monkeypatch) -> None:
    from qwen_engine import cli

    path = str(vl_dir / "picture0.png")
    options = ["--model", str(vl_dir), "--dtype", "float32", "--max-tokens", "3", "--temperature", "0"]
    expected = vl.chat([{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "What?"}]}],
                       max_tokens=3, temperature=0)
    assert cli.main(["chat", *options, "--image", path, "--once", "What?"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {path}\nWhat?\n"))
    assert cli.main(["chat", *options]) == 0
    assert capsys.readouterr().out == expected.text + "\n"


def test_qwen_chat_image_errors_are_one_line(vl_dir, tiny_gguf, capsys) -> None:
    from qwen_engine import cli

    assert cli.main(["chat", "--model", str(vl_dir), "--image", str(vl_dir / "absent.png"), "--once", "Hi"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [f"qwen: error: image not found: {vl_dir / 'absent.png'}"]
    assert cli.main(["chat", "--model", str(tiny_gguf), "--image", str(vl_dir / "picture0.png"), "--once", "Hi"]) != 0
    assert "reads text" in capsys.readouterr().err


def test_the_server_takes_data_url_images_and_refuses_the_rest(vl, vl_dir, tiny_gguf) -> None:
    import base64

    import openai
    from test_server import Running

    data = (vl_dir / "picture0.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()

    def ask(client, *urls: str, stream: bool = False):
        content = [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "What?"}]
        return client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=[{"role": "user", "content": content}],
                                              max_tokens=3, temperature=0, stream=stream)

    expected = vl.chat([{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "What?"}]}],
                       max_tokens=3, temperature=0).text
    running = Running(vl)
    try:
        client = running.client()
        assert ask(client, url).choices[0].message.content == expected
        assert "".join(c.choices[0].delta.content or "" for c in ask(client, url, stream=True) if c.choices) == expected
        for bad, message in (("https://example.com/cat.png", "remote image URLs"), (str(vl_dir / "picture0.png"), "image paths"),
                             ("data:image/png;base64,AAAA", "not an image"), ("data:image/png,raw", "base64")):
            with pytest.raises(openai.BadRequestError, match=message):
                ask(client, bad)
        with pytest.raises(openai.BadRequestError, match="at most 4"):
            ask(client, *[url] * 5)
        for prompt, message in ((f"<img>{vl_dir / 'picture0.png'}</img>What?", "does not read"), ("<img>x.png", "no </img>")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.completions.create(model="qwen2.5-coder-0.5b-instruct", prompt=prompt, max_tokens=1)
        assert ask(client, url).choices[0].message.content == expected  # still serving
    finally:
        running.close()
    text_only = Running(qwen_engine.load(tiny_gguf, dtype="float32"))
    try:
        with pytest.raises(openai.BadRequestError, match="reads text"):
            ask(text_only.client(), url)
    finally:
        text_only.close()
