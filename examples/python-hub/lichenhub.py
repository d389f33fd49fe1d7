#!/usr/bin/env python3
"""A small Lichen hub in Python, written from docs/topics.md alone.

It is a reference for the wire contract between Lichen nodes and a hub, not a product: it
signs and publishes a desired state, publishes artifacts in chunks, sends a command and reads
its result, and reads telemetry and reported state, over any MQTT 3.1.1 broker.

Needs paho-mqtt (1.6 or 2.x) and cryptography (38 or later). Usage:

    python3 lichenhub.py keygen publisher.key
    python3 lichenhub.py digest counter.wasm
    python3 lichenhub.py deploy --url mqtt://127.0.0.1:1883 --node pi-7 --key publisher.key \\
        --version 2 site.toml --artifact counter.wasm
    python3 lichenhub.py send --url mqtt://127.0.0.1:1883 --node pi-7 counter get
    python3 lichenhub.py reported --url mqtt://127.0.0.1:1883 --node pi-7
    python3 lichenhub.py telemetry --url mqtt://127.0.0.1:1883 --node pi-7 --count 3

The deployment file names each module by digest (`module = "sha256:<digest>"`, which `digest`
prints); `deploy` publishes the `--artifact` files, then the signed desired state.
"""

import argparse
import base64
import hashlib
import json
import os
import queue
import ssl
import sys
import threading
import time
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# docs/topics.md, "The signed bytes": "lichen-desired-v1" LF node LF version LF deployment, or,
# when the desired state lists artifact sizes, "lichen-desired-v2" LF node LF version LF count LF,
# one "<sha256> <size>" LF per artifact in digest order, then the deployment.
SIGNATURE_CONTEXT = b"lichen-desired-v1"
SIGNATURE_CONTEXT_V2 = b"lichen-desired-v2"
# docs/topics.md, "Artifacts": chunks of 1 KiB to 512 KiB, 64 KiB by default.
MIN_CHUNK = 1024
MAX_CHUNK = 512 * 1024
DEFAULT_CHUNK = 64 * 1024
# The origin of this hub's message ids (docs/topics.md, "The envelope").
ORIGIN = "pyhub"


def now_ms():
    return time.time_ns() // 1_000_000


def topic(node, *levels):
    return "/".join(("lichen", "v1", node) + levels)


def envelope(origin, sequence, payload):
    """The JSON envelope: id `<origin>:<sequence>`, `ts` in ms, the payload."""
    message = {"id": f"{origin}:{int(sequence)}", "ts": now_ms(), "payload": payload}
    return json.dumps(message, separators=(",", ":")).encode()


def canonical_bytes(node, version, deployment, artifacts=None):
    """The exact bytes a desired state's signature covers; `artifacts` maps digest -> size."""
    if not artifacts:
        return b"\n".join(
            [SIGNATURE_CONTEXT, node.encode(), str(int(version)).encode(), deployment.encode()]
        )
    head = [SIGNATURE_CONTEXT_V2, node.encode(), str(int(version)).encode(), str(len(artifacts)).encode()]
    lines = b"".join(f"{digest} {int(artifacts[digest])}\n".encode() for digest in sorted(artifacts))
    return b"\n".join(head) + b"\n" + lines + deployment.encode()


def raw_public_key(private_key):
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def key_id(public_raw):
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def keygen(path):
    """Writes a new Ed25519 key as PKCS#8 PEM (0600) and its public key in hex to PATH.pub."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = raw_public_key(key).hex()
    with open(path + ".pub", "w") as f:
        f.write(public + "\n")
    return public


def load_key(path):
    """An Ed25519 private key from PKCS#8 PEM or DER (as `lichen hub keygen` or OpenSSL write)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip().startswith(b"-----"):
        key = serialization.load_pem_private_key(data, password=None)
    else:
        key = serialization.load_der_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SystemExit(f"{path}: not an Ed25519 private key")
    return key


def sign_desired(key, node, version, deployment, artifacts=None):
    """The payload of a `desired` message, signed for `node` and `version`, with the size of
    each artifact it names (digest -> bytes): a node fetches only those, only that big."""
    signature = key.sign(canonical_bytes(node, version, deployment, artifacts))
    desired = {
        "version": int(version),
        "deployment": deployment,
        "signature": base64.b64encode(signature).decode("ascii"),
        "key-id": key_id(raw_public_key(key)),
    }
    if artifacts:
        desired["artifacts"] = {digest: int(size) for digest, size in sorted(artifacts.items())}
    return desired


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def split_artifact(data, chunk_size=DEFAULT_CHUNK):
    """The manifest of an artifact and its chunks."""
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size {chunk_size} is outside {MIN_CHUNK}..{MAX_CHUNK}")
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    manifest = {
        "digest": sha256_hex(data),
        "size": len(data),
        "chunk-size": chunk_size,
        "chunks": [sha256_hex(c) for c in chunks],
    }
    return manifest, chunks


def make_client(client_id):
    """A paho client, whichever major version is installed (2.x wants a callback API version)."""
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    return mqtt.Client(client_id=client_id, clean_session=True)


def failed(reason_code):
    """Whether a CONNACK/SUBACK code (an int in paho 1.x, a ReasonCode in 2.x) is a failure."""
    if hasattr(reason_code, "is_failure"):
        return reason_code.is_failure
    return reason_code != 0


class Hub:
    """One connection to the broker: publish and wait for the PUBACK, subscribe and wait for the
    SUBACK, and a queue of the messages that arrive."""

    def __init__(self, url, ca_file=None, timeout=30.0):
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise SystemExit(f"--url {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        tls = parsed.scheme == "mqtts"
        port = parsed.port or (8883 if tls else 1883)
        self.timeout = timeout
        self.messages = queue.Queue()
        self.client = make_client(f"{ORIGIN}-{os.getpid()}-{time.time_ns() % 1_000_000}")
        self._connected = threading.Event()
        self._connect_error = None
        self._subacks = {}
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        if tls:
            if not ca_file:
                raise SystemExit("an mqtts:// url needs --ca-file")
            self.client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.connect(parsed.hostname, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise SystemExit(f"{url}: no CONNACK within {timeout} s")
        if self._connect_error is not None:
            self.close()
            raise SystemExit(f"{url}: connection refused: {self._connect_error}")

    def _on_connect(self, client, userdata, flags, reason_code, *rest):
        if failed(reason_code):
            self._connect_error = reason_code
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, *rest):
        with self._lock:
            event = self._subacks.setdefault(mid, threading.Event())
        event.set()

    def _on_message(self, client, userdata, message):
        self.messages.put((message.topic, bytes(message.payload), bool(message.retain)))

    def publish(self, topic_name, payload, retain=False):
        """Publishes at QoS 1 and waits for the broker's PUBACK."""
        info = self.client.publish(topic_name, payload, qos=1, retain=retain)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise SystemExit(f"no PUBACK for {topic_name} within {self.timeout} s")

    def subscribe(self, topic_filter):
        """Subscribes at QoS 1 and waits for the SUBACK."""
        result, mid = self.client.subscribe(topic_filter, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise SystemExit(f"cannot subscribe to {topic_filter}: {mqtt.error_string(result)}")
        with self._lock:
            event = self._subacks.setdefault(mid, threading.Event())
        if not event.wait(self.timeout):
            raise SystemExit(f"no SUBACK for {topic_filter} within {self.timeout} s")

    def next_message(self, deadline):
        """The next (topic, payload, retained) before `deadline` (time.monotonic()), or None."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return self.messages.get(timeout=left)
        except queue.Empty:
            return None

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()

    # The operations of a hub.

    def publish_artifact(self, node, data, chunk_size=DEFAULT_CHUNK):
        """Publishes an artifact (retained): its manifest, then its chunks as raw bytes."""
        manifest, chunks = split_artifact(data, chunk_size)
        digest = manifest["digest"]
        self.publish(topic(node, "artifact", digest), envelope(ORIGIN, now_ms(), manifest), retain=True)
        for index, chunk in enumerate(chunks):
            self.publish(topic(node, "artifact", digest, str(index)), chunk, retain=True)
        return manifest

    def deploy(self, node, key, version, deployment, artifacts=(), chunk_size=DEFAULT_CHUNK):
        """Publishes the artifacts, then the desired state signed for `node` (retained)."""
        manifests = [self.publish_artifact(node, data, chunk_size) for data in artifacts]
        sizes = {m["digest"]: m["size"] for m in manifests}
        desired = sign_desired(key, node, version, deployment, sizes)
        self.publish(topic(node, "desired"), envelope(ORIGIN, version, desired), retain=True)
        return desired, manifests

    def send(self, node, workload, command, payload=None):
        """Sends a command and returns its result (the payload of its `cmd-result` message)."""
        self.subscribe(topic(node, "cmd-result", workload))
        sequence = time.time_ns() // 1000
        command_id = f"{ORIGIN}-{os.getpid()}:{sequence}"
        body = {"command": command}
        if payload is not None:
            body["payload"] = payload
        self.publish(topic(node, "cmd", workload), envelope(f"{ORIGIN}-{os.getpid()}", sequence, body))
        deadline = time.monotonic() + self.timeout
        while (message := self.next_message(deadline)) is not None:
            name, raw, _ = message
            if name != topic(node, "cmd-result", workload):
                continue
            result = json.loads(raw)["payload"]
            if result.get("cmd") == command_id:
                return result
        raise SystemExit(f"no result for command {command_id} within {self.timeout} s")

    def reported(self, node, want=lambda state: True):
        """The node's reported state (retained), the first one `want` accepts."""
        self.subscribe(topic(node, "reported"))
        deadline = time.monotonic() + self.timeout
        while (message := self.next_message(deadline)) is not None:
            name, raw, _ = message
            if name == topic(node, "reported"):
                state = json.loads(raw)["payload"]
                if want(state):
                    return state
        raise SystemExit(f"no matching reported state of node {node} within {self.timeout} s")

    def telemetry(self, node, count):
        """The next `count` telemetry messages of `node`, each as a dict."""
        self.subscribe(topic(node, "telemetry", "#"))
        prefix = topic(node, "telemetry") + "/"
        out = []
        deadline = time.monotonic() + self.timeout
        while len(out) < count and (message := self.next_message(deadline)) is not None:
            name, raw, _ = message
            if not name.startswith(prefix):
                continue
            workload, stream = name[len(prefix) :].split("/", 1)
            env = json.loads(raw)
            origin, sequence = env["id"].rsplit(":", 1)
            out.append(
                {
                    "topic": name,
                    "workload": workload,
                    "stream": stream,
                    "origin": origin,
                    "sequence": int(sequence),
                    "ts": env["ts"],
                    "payload": env["payload"],
                }
            )
        if len(out) < count:
            raise SystemExit(f"{len(out)} of {count} telemetry messages within {self.timeout} s")
        return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    def broker(p):
        p.add_argument("--url", required=True, help="mqtt://host[:port] or mqtts://host[:port]")
        p.add_argument("--ca-file", help="CA certificate for mqtts://")
        p.add_argument("--node", required=True)
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")

    p = verbs.add_parser("keygen", help="write a new Ed25519 publisher key pair")
    p.add_argument("out")
    p = verbs.add_parser("digest", help="print the sha256 digest a deployment names a module by")
    p.add_argument("file")
    p = verbs.add_parser("deploy", help="publish artifacts and a signed desired state")
    broker(p)
    p.add_argument("--key", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--artifact", action="append", default=[])
    p.add_argument("deployment")
    p = verbs.add_parser("send", help="send a command and print its result")
    broker(p)
    p.add_argument("workload")
    p.add_argument("command")
    p.add_argument("payload", nargs="?")
    p = verbs.add_parser("reported", help="print the node's reported state")
    broker(p)
    p.add_argument("--applied", type=int, help="wait for this applied-version")
    p.add_argument("--rejected", type=int, help="wait for a last-rejection of this version")
    p = verbs.add_parser("telemetry", help="print the next telemetry messages, one JSON per line")
    broker(p)
    p.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)

    if args.verb == "keygen":
        public = keygen(args.out)
        print(json.dumps({"private": args.out, "public-key": public, "key-id": key_id(bytes.fromhex(public))}))
        return 0
    if args.verb == "digest":
        with open(args.file, "rb") as f:
            print(sha256_hex(f.read()))
        return 0
    hub = Hub(args.url, args.ca_file, args.timeout)
    try:
        if args.verb == "deploy":
            with open(args.deployment, encoding="utf-8") as f:
                deployment = f.read()
            artifacts = []
            for path in args.artifact:
                with open(path, "rb") as f:
                    artifacts.append(f.read())
            desired, manifests = hub.deploy(
                args.node, load_key(args.key), args.version, deployment, artifacts, args.chunk_size
            )
            print(
                json.dumps(
                    {
                        "node": args.node,
                        "version": desired["version"],
                        "key-id": desired["key-id"],
                        "artifacts": [{"digest": m["digest"], "chunks": len(m["chunks"])} for m in manifests],
                    }
                )
            )
            return 0
        if args.verb == "send":
            result = hub.send(args.node, args.workload, args.command, args.payload)
            print(json.dumps(result))
            return 0 if result.get("ok") else 1
        if args.verb == "reported":
            def want(state):
                if args.applied is not None and state.get("applied-version") != args.applied:
                    return False
                rejection = state.get("last-rejection") or {}
                return args.rejected is None or rejection.get("version") == args.rejected

            print(json.dumps(hub.reported(args.node, want)))
            return 0
        if args.verb == "telemetry":
            for message in hub.telemetry(args.node, args.count):
                print(json.dumps(message))
            return 0
    finally:
        hub.close()
    return 2


if __name__ == "__main__":
    sys.exit(main())
