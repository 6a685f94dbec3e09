"""Writes the wine example's model and data: a scikit-learn classifier converted with skl2onnx.

python examples/wine/make_model.py          # writes wine.onnx, calib.npz, val.npz here
tandem models build --spec examples/wine/model.toml --out zoo/
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def main(folder: Path) -> None:
    x, y = load_wine(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.4, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    # zipmap=False: probabilities as a plain [N, 3] tensor, not a list of dicts.
    onnx_model = to_onnx(
        model,
        x_train[:1],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    # skl2onnx may list the default domain twice; ONNX Runtime's quantizer wants it once.
    opsets = {o.domain: o.version for o in onnx_model.opset_import}
    del onnx_model.opset_import[:]
    for domain, version in opsets.items():
        onnx_model.opset_import.add(domain=domain, version=version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wine.onnx").write_bytes(onnx_model.SerializeToString())
    np.savez(folder / "calib.npz", X=x_train)
    np.savez(folder / "val.npz", X=x_val, labels=y_val)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
