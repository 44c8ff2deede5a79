"""A stand-in for TensorFlow Serving's REST API on a loopback port, for the gateway's tests.

It answers what `translator serve --backend URL` asks of TF Serving (model status, metadata and
columnar `:predict`) by running the SavedModel's signatures directly with TensorFlow, and
records every request body. It shares no code with `translator.server`, so the gateway is
tested against TF Serving's wire format rather than against itself.
"""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
STATUS = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")


class TFServingStub:
    """Serves one model (`name`, version from the directory) on 127.0.0.1 until `close()`."""

    def __init__(self, version_dir: Path, name: str, port: int = 0):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401 - the SentencePiece ops
        from google.protobuf import json_format
        from tensorflow.core.protobuf import saved_model_pb2

        self.name = name
        self.version = int(version_dir.name)
        self.model = tf.saved_model.load(str(version_dir))
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
        self.signature_defs = {
            k: json_format.MessageToDict(
                v, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for k, v in proto.meta_graphs[0].signature_def.items()
        }
        self.requests: list[tuple[str, str, dict | None]] = []
        self.fail_next: tuple[int, str] | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, payload):
                body = json.dumps(payload, allow_nan=True).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                stub.requests.append(("GET", self.path, None))
                match = STATUS.match(self.path)
                if not match or match.group(1) != stub.name:
                    name = match.group(1) if match else self.path
                    return self._send(404, {"error": f"Servable not found for request: {name}"})
                version = match.group(2)
                if version is not None and int(version) != stub.version:
                    spec = f"Specific({stub.name}, {version})"
                    return self._send(404, {"error": f"Servable not found for request: {spec}"})
                if match.group(3):
                    return self._send(
                        200,
                        {
                            "model_spec": {
                                "name": stub.name,
                                "signature_name": "",
                                "version": str(stub.version),
                            },
                            "metadata": {"signature_def": {"signature_def": stub.signature_defs}},
                        },
                    )
                state = {"error_code": "OK", "error_message": ""}
                version_status = {"version": str(stub.version), "state": "AVAILABLE"}
                return self._send(
                    200, {"model_version_status": [{**version_status, "status": state}]}
                )

            def do_POST(self):
                import tensorflow as tf

                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                stub.requests.append(("POST", self.path, body))
                if stub.fail_next is not None:
                    status, message = stub.fail_next
                    stub.fail_next = None
                    return self._send(status, {"error": message})
                match = PREDICT.match(self.path)
                if not match or match.group(1) != stub.name:
                    return self._send(404, {"error": "Servable not found for request"})
                name = body.get("signature_name") or "serving_default"
                if name not in stub.model.signatures or "inputs" not in body:
                    return self._send(400, {"error": "this stub speaks the columnar format only"})
                signature = stub.model.signatures[name]
                specs = signature.structured_input_signature[1]
                inputs = body["inputs"]
                if not isinstance(inputs, dict):
                    inputs = {next(iter(specs)): inputs}
                try:
                    kwargs = {k: tf.constant(inputs[k], spec.dtype) for k, spec in specs.items()}
                    with stub._lock:
                        out = signature(**kwargs)
                except (KeyError, ValueError, tf.errors.InvalidArgumentError) as e:
                    return self._send(400, {"error": str(e).splitlines()[0]})
                outputs = {}
                for key, value in out.items():
                    array = value.numpy()
                    if array.dtype == object:
                        flat = [v.decode("utf-8") for v in array.reshape(-1)]
                        outputs[key] = np.array(flat, dtype=object).reshape(array.shape).tolist()
                    else:
                        outputs[key] = array.tolist()
                return self._send(200, {"outputs": outputs})

        return Handler
