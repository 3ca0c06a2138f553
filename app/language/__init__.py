"""Language models on the user's own machine: trained in the app on the project's own text, or brought as a local
transformers folder, and stored/registered in the project.

- `tokenizer`: a byte-level BPE tokenizer trained on the project's text with the `tokenizers` library.
- `data`: the training material gathered from a project (captions, concept-masked regions, unit descriptions).
- `train`: the training job (`TrainJob`) for the dual encoder, the set captioner and the causal LM, with resume.
- `registry`: bringing a folder (`add_folder`), validated before anything is written.

Loading a folder for a method is `labelers.textmodels.load`, which the labelers share. torch and transformers are
imported inside functions: importing this package costs nothing.
"""
