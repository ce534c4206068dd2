"""Our own ComfyUI documents on the embedded demo model, written by hand for the tests: API-format prompts for
text-to-image and image-to-image from an uploaded picture (LoadImage "subfolder/name", VAEEncode, KSampler at
denoise 0.6), with a ``_meta`` title on every node as ComfyUI's "Export (API)" writes them and as several clients
look nodes up by title; and a small text-to-image graph in its editor's (UI) format."""

from __future__ import annotations

import copy

SAVE_TITLE = "Save Image"

_TEXT_TO_IMAGE = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "demo-lcm"},
          "_meta": {"title": "Load Checkpoint"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle on a blue background", "clip": ["4", 1]},
          "_meta": {"title": "Positive"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}, "_meta": {"title": "Negative"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1},
          "_meta": {"title": "Empty Latent Image"}},
    "3": {"class_type": "KSampler",
          "inputs": {"model": ["4", 0], "seed": 7, "steps": 4, "cfg": 1.0, "sampler_name": "lcm",
                     "scheduler": "sgm_uniform", "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0], "denoise": 1.0},
          "_meta": {"title": "KSampler"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "_meta": {"title": "VAE Decode"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "client"},
          "_meta": {"title": SAVE_TITLE}},
}


def text_to_image(prefix: str = "client", seed: int = 7) -> dict:
    prompt = copy.deepcopy(_TEXT_TO_IMAGE)
    prompt["9"]["inputs"]["filename_prefix"] = prefix
    prompt["3"]["inputs"]["seed"] = seed
    return prompt


def image_to_image(image: str, prefix: str = "client-img2img", load_title: str = "Load Image") -> dict:
    """``image`` is what LoadImage names: "subfolder/name" for an upload into a subfolder."""
    prompt = text_to_image(prefix)
    del prompt["5"]
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": image}, "_meta": {"title": load_title}}
    prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]},
                    "_meta": {"title": "VAE Encode"}}
    prompt["3"]["inputs"].update(latent_image=["11", 0], denoise=0.6)
    return prompt


# --- the editor's (UI) format ---------------------------------------------------------------------------------------

def comfy_ui_node(node_id, kind, pos, widgets=(), inputs=(), outputs=(), title=None, order=0) -> dict:
    """One node as ComfyUI's editor saves it; ``inputs`` are (name, type, link id) and ``outputs`` (name, type,
    [link ids]) tuples."""
    entry = {"id": node_id, "type": kind, "pos": list(pos), "size": [300, 120], "flags": {}, "order": order,
             "mode": 0, "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
             "outputs": [{"name": n, "type": t, "links": links, "slot_index": i}
                         for i, (n, t, links) in enumerate(outputs)],
             "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets)}
    if title:
        entry["title"] = title
    return entry


def comfy_ui_workflow() -> dict:
    """A small text-to-image graph as ComfyUI's editor saves it (version 0.4): the KSampler's widgets carry the
    control-after-generate value after the seed; a Note and a group ride along."""
    node = comfy_ui_node
    nodes = [
        node(4, "CheckpointLoaderSimple", (20, 200), ["demo-lcm"],
             outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [3, 5]), ("VAE", "VAE", [8])], order=0),
        node(6, "CLIPTextEncode", (400, 60), ["a red circle on a blue background"], inputs=[("clip", "CLIP", 3)],
             outputs=[("CONDITIONING", "CONDITIONING", [4])], title="Positive", order=1),
        node(7, "CLIPTextEncode", (400, 300), [""], inputs=[("clip", "CLIP", 5)],
             outputs=[("CONDITIONING", "CONDITIONING", [6])], title="Negative", order=2),
        node(5, "EmptyLatentImage", (400, 520), [64, 64, 1], outputs=[("LATENT", "LATENT", [2])], order=3),
        node(3, "KSampler", (820, 200), [7, "fixed", 4, 1.0, "lcm", "sgm_uniform", 1.0],
             inputs=[("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
                     ("latent_image", "LATENT", 2)], outputs=[("LATENT", "LATENT", [7])], order=4),
        node(8, "VAEDecode", (1200, 200), [], inputs=[("samples", "LATENT", 7), ("vae", "VAE", 8)],
             outputs=[("IMAGE", "IMAGE", [9])], order=5),
        node(9, "SaveImage", (1500, 200), ["from-comfy"], inputs=[("images", "IMAGE", 9)], order=6),
        node(10, "Note", (20, 520), ["drawn by hand for the canvas test"], order=7),
    ]
    # [link id, origin node, origin slot, target node, target slot, type]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
             [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]
    return {"last_node_id": 10, "last_link_id": 9, "nodes": nodes, "links": links,
            "groups": [{"title": "Sampling", "bounding": [380, 0, 800, 700], "color": "#3f789e", "font_size": 24}],
            "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}
