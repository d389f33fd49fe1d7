"""py-sensor: a Lichen device function written in Python (componentize-py).

Every interval `tick` it reads the TMP102 temperature sensor that its deployment names `env`
(I2C, register 0, 12 bits at 1/16 degC per step), keeps the number of readings and the last
one in the default key-value bucket (so they survive restarts and hot reloads), and publishes
`{"celsius":T,"readings":N}` on the telemetry stream `temperature`.

- Config: `address`, the sensor's I2C address in decimal or 0x hex (default 0x48).
- Commands: `status` replies `{"celsius":T,"readings":N,"version":V}`; `reset` sets the count
  back to 0 and replies `{"readings":0}`.

Build with `scripts/build-foreign-guests` (componentize-py against host-apis/wit).
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import i2c, logging, telemetry, types
from wit_world.imports import wasi_keyvalue_store as store

# Shown in `status`, so a test can see that a hot reload took effect.
VERSION = "1"
CONTEXT = "py-sensor"

address = 0x48


def bucket() -> store.Bucket:
    return store.open("default")


def read_number(b: store.Bucket, key: str, default):
    raw = b.get(key)
    if raw is None:
        return default
    return json.loads(raw.decode())


def read_celsius() -> float:
    bus = i2c.open("env")
    reads = bus.transaction(address, [i2c.Operation_Write(b"\x00"), i2c.Operation_Read(2)])
    data = reads[0]
    if len(data) != 2:
        raise Err("the host returned %d bytes for a 2-byte read" % len(data))
    raw = int.from_bytes(data, "big", signed=True)
    steps = raw >> 3 if data[1] & 1 else raw >> 4
    return steps / 16.0


def describe(err) -> str:
    return "%s(%r)" % (type(err.value).__name__, getattr(err.value, "value", None))


class WitWorld(wit_world.WitWorld):
    def init(self, config):
        global address
        for key, value in config:
            if key == "address":
                try:
                    address = int(value, 0)
                except ValueError:
                    raise Err('config "address" must be a number, got %r' % value)
                if not 0 <= address <= 0x3FF:
                    raise Err('config "address" must be 0 to 0x3ff, got %r' % value)

    def on_event(self, event):
        if isinstance(event, types.Event_Tick):
            return self.on_tick()
        if isinstance(event, types.Event_Command):
            return self.on_command(event.value)
        return None

    def on_tick(self):
        try:
            celsius = read_celsius()
        except Err as err:
            raise Err("cannot read the sensor: " + describe(err))
        b = bucket()
        readings = read_number(b, "readings", 0) + 1
        b.set("readings", json.dumps(readings).encode())
        b.set("celsius", json.dumps(celsius).encode())
        record = json.dumps({"celsius": celsius, "readings": readings}, separators=(",", ":"))
        telemetry.publish("temperature", record.encode())
        return None

    def on_command(self, command):
        b = bucket()
        if command.name == "status":
            reply = {
                "celsius": read_number(b, "celsius", None),
                "readings": read_number(b, "readings", 0),
                "version": VERSION,
            }
        elif command.name == "reset":
            b.set("readings", b"0")
            logging.log(logging.Level.INFO, CONTEXT, "readings reset by command " + command.id)
            reply = {"readings": 0}
        else:
            raise Err("unknown command %r (expected status or reset)" % command.name)
        return json.dumps(reply, separators=(",", ":")).encode()
