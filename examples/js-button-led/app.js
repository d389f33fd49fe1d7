// js-button-led: a Lichen device function written in JavaScript (componentize-js).
//
// On every `gpio-edge` of the input pin its deployment names `button` (pull-up: pressed is
// low) it sets the output pin `led` to follow the button (lit while pressed) and, on each press,
// counts it in the default key-value bucket (so the count survives restarts and hot reloads)
// and publishes `{"presses":N}` on the telemetry stream `button`.
//
// The LED and the bucket are opened once per instance and kept: the host gives one handle per
// pin at a time, and JavaScript frees a resource only when its garbage collector runs (maybe
// never), so opening the LED on every event would make the second `getOutput('led')` fail
// with `already-in-use`.
//
// Commands: `status` replies `{"presses":N,"led":"on"|"off","version":V}`; `set-led` with
// payload `on` or `off` drives the LED and replies with the new status.
//
// Build with `scripts/build-foreign-guests` (componentize-js against host-apis/wit).

import { getOutput } from 'lichen:device/gpio@0.1.0';
import { publish } from 'lichen:device/telemetry@0.1.0';
import { open } from 'wasi:keyvalue/store@0.2.0-draft';
import { log } from 'wasi:logging/logging@0.1.0-draft';

// Shown in `status`, so a test can see that a hot reload took effect.
const VERSION = '1';
const CONTEXT = 'js-button-led';
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function presses(bucket) {
  const raw = bucket.get('presses');
  return raw === undefined ? 0 : Number(decoder.decode(raw));
}

function describe(error) {
  const payload = error && error.payload !== undefined ? error.payload : error;
  if (payload && payload.tag !== undefined) {
    return `${payload.tag}(${JSON.stringify(payload.val)})`;
  }
  return String(payload);
}

// The `led` output and the default bucket, opened on first use and kept for the instance's
// life (a handle per event would pile up in the host's table until a collection).
let ledPin;
let defaultBucket;

function bucket() {
  if (defaultBucket === undefined) {
    defaultBucket = open('default');
  }
  return defaultBucket;
}

function led() {
  if (ledPin === undefined) {
    ledPin = getOutput('led');
  }
  return ledPin;
}

function setLed(on) {
  try {
    led().setLevel(on ? 'high' : 'low');
  } catch (e) {
    throw `cannot drive the led: ${describe(e)}`;
  }
}

function status() {
  let lit;
  try {
    lit = led().isSetHigh();
  } catch (e) {
    throw `cannot read the led: ${describe(e)}`;
  }
  const reply = { presses: presses(bucket()), led: lit ? 'on' : 'off', version: VERSION };
  return encoder.encode(JSON.stringify(reply));
}

export function init(_config) {}

export function onEvent(event) {
  switch (event.tag) {
    case 'gpio-edge': {
      if (event.val.name !== 'button') return undefined;
      const pressed = event.val.edge === 'falling';
      setLed(pressed);
      if (pressed) {
        const count = presses(bucket()) + 1;
        bucket().set('presses', encoder.encode(String(count)));
        publish('button', encoder.encode(JSON.stringify({ presses: count })));
      }
      return undefined;
    }
    case 'command': {
      const command = event.val;
      if (command.name === 'status') return status();
      if (command.name === 'set-led') {
        const want = decoder.decode(command.payload).trim();
        if (want !== 'on' && want !== 'off') {
          throw `set-led wants "on" or "off", got ${JSON.stringify(want)}`;
        }
        setLed(want === 'on');
        log('info', CONTEXT, `led ${want} by command ${command.id}`);
        return status();
      }
      throw `unknown command ${JSON.stringify(command.name)} (expected status or set-led)`;
    }
    default:
      return undefined;
  }
}
