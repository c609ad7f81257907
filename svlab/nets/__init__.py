"""The field's networks beside the lab's: ``resnet`` (ResNet34 r-vector) and ``campplus`` (CAM++).

Model files only (torch, nothing else of the project): like ``xvector.py`` and ``ecapa.py`` at the top,
each takes ``(batch, n_features, frames)`` and an injected pooling module, and returns
``(batch, embedding_size)``. ``svlab.models`` builds them by name (``model.name: resnet34 | campplus``).
"""
