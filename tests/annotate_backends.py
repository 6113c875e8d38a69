"""Backends that misbehave on purpose, for the annotate stage's failure tests (importable by Ray workers)."""

from sarlang_ray.annotate.template import TemplateAnnotator


class FlakyBackend:
    """Tiles whose (row, col) number is a multiple of 3 raise; of 5, return malformed pairs."""

    name = "flaky"

    def __init__(self, cfg):
        self.inner = TemplateAnnotator()

    def annotate(self, tile):
        n = int(tile["tile_id"].rsplit("_c", 1)[1]) + 10 * int(tile["tile_id"].rsplit("_r", 1)[1][:4])
        if n % 3 == 0:
            raise RuntimeError("model server returned HTTP 500")
        if n % 5 == 0:
            return [
                {
                    "kind": "vqa",
                    "application": "astrology",
                    "question": "?",
                    "answer": "x",
                    "question_type": "x",
                }
            ]
        return self.inner.annotate(tile)


class SlowBackend:
    """The template annotator at a model's pace (50 ms a tile): a stage long enough to lose a node in."""

    name = "slow"

    def __init__(self, cfg):
        self.inner = TemplateAnnotator()

    def annotate(self, tile):
        import time

        time.sleep(0.05)
        return self.inner.annotate(tile)


class HallucinatingBackend:
    """The template annotator, plus on every tile without a harbour a caption that names one: QC's
    hallucination rule rejects it (the viewer test shows a rejected pair with its reason)."""

    name = "hallucinating"

    def __init__(self, cfg):
        self.inner = TemplateAnnotator()

    def annotate(self, tile):
        pairs = self.inner.annotate(tile)
        if "harbour" not in {o["class"] for o in tile.get("objects") or []}:
            pairs.append(
                {
                    "kind": "caption_concise",
                    "application": "image description",
                    "question_type": "caption/concise",
                    "question": "Describe the content of this image in one sentence.",
                    "answer": "A busy harbour with cranes along its quays.",
                }
            )
        return pairs
