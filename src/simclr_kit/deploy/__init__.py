"""Taking an encoder or a classifier out of simclr-kit: ONNX graphs and hub folders.

- ``onnx_export.py``: an encoder (features) or a classifier (logits) as one ONNX graph that takes
  uint8 pixels, normalisation inside, checked against torch with ONNX Runtime.
- ``onnx_predict.py``: ``simclr predict --onnx``, the same CSV as ``predict`` from such a graph.
- ``hub.py``: a folder ready for the Hugging Face hub (``model.safetensors``, ``config.json``,
  ``README.md``), and ``hf-hub:OWNER/NAME`` names resolved to such a folder.
- ``model_card.py``: that folder's ``README.md``, from the run's metadata and evaluation.
- ``loading_code.py``: the few lines of plain torchvision or timm that load the folder, checked
  before the card shows them.

onnx and onnxruntime are an optional extra (``pip install 'simclr-kit[onnx]'``), imported only
here and only when asked for.
"""
