#!/usr/bin/env node
// A Node.js client of trio_bridge: watches every variable of a session, writes one once it holds
// their current values, and prints each update as docs/protocol.md's Python client does. It exits 0
// after --changes value changes (its own write counts), 1 on an error status, 2 on bad arguments.
//
//   npm ci --prefix examples/node
//   node examples/node/watch.js --session greenhouse --set temperature=23.5 --source node
//
// Each option falls back on an environment variable: --host TRIO_BRIDGE_HOST (127.0.0.1),
// --port TRIO_BRIDGE_PORT (50051), --session TRIO_BRIDGE_SESSION.
'use strict';

const path = require('node:path');
const { parseArgs, promisify } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'unified_bridge.proto');
const USAGE = 'usage: node watch.js --session ID [--host HOST] [--port PORT] [--set NAME=VALUE] '
  + '[--source SOURCE] [--changes N]';

// The service for grpc-js, loaded at run time: messages are plain objects with the .proto's field
// names, enums are their names, int64 fields are decimal strings, an unset message field is null.
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true, enums: String, longs: String, defaults: true,
});
const { UnifiedBridge } = grpc.loadPackageDefinition(definition).unified_bridge;
// The same .proto and the wrappers for protobufjs, to decode and encode the messages in an Any.
const messages = protobuf.loadSync([PROTO, 'google/protobuf/wrappers.proto']);

// The message a value of each variable type is packed in (docs/protocol.md, "Value encoding").
const PACKED = {
  VARIABLE_TYPE_FLOAT: 'google.protobuf.DoubleValue',
  VARIABLE_TYPE_INTEGER: 'google.protobuf.Int64Value',
  VARIABLE_TYPE_STRING: 'google.protobuf.StringValue',
  VARIABLE_TYPE_BOOLEAN: 'google.protobuf.BoolValue',
  VARIABLE_TYPE_CHOICE: 'google.protobuf.StringValue',
  VARIABLE_TYPE_MODULE: 'google.protobuf.StringValue',
  VARIABLE_TYPE_EMBEDDING: 'unified_bridge.Embedding',
  VARIABLE_TYPE_TENSOR: 'unified_bridge.Tensor',
};

// A value's google.protobuf.Any ({type_url, value: Buffer}) as text: its payload is the message that
// the type_url names after its last "/", serialized.
function unpack(any) {
  const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
  const type = messages.lookupType(name);
  const message = type.toObject(type.decode(any.value), { longs: String, defaults: true });
  if (name === 'unified_bridge.Embedding') return `[${message.values.join(', ')}]`;
  if (name === 'unified_bridge.Tensor') {
    return `tensor ${message.dtype} [${message.shape.join(', ')}] (${message.data.length} bytes)`;
  }
  return String(message.value); // DoubleValue, Int64Value (a decimal string), StringValue, BoolValue
}

// The text of --set NAME=VALUE as a value of the variable's type, packed in an Any.
function pack(type, text) {
  const name = PACKED[type];
  let fields = { value: text }; // string, choice, module; an int64 as a decimal string
  if (type === 'VARIABLE_TYPE_FLOAT') fields = { value: Number(text) };
  if (type === 'VARIABLE_TYPE_BOOLEAN') fields = { value: text === 'true' };
  if (type === 'VARIABLE_TYPE_EMBEDDING') fields = { values: text.split(',').map(Number) };
  if (type === 'VARIABLE_TYPE_TENSOR') throw new Error('--set writes no tensors');
  const message = messages.lookupType(name);
  const value = message.encode(message.fromObject(fields)).finish();
  return { type_url: `type.googleapis.com/${name}`, value };
}

// A google.protobuf.Timestamp ({seconds: string, nanos}) as 2026-12-02T05:40:00.123Z.
function utc(timestamp) {
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6)).toISOString();
}

function options() {
  const { values } = parseArgs({
    options: {
      host: { type: 'string', default: process.env.TRIO_BRIDGE_HOST || '127.0.0.1' },
      port: { type: 'string', default: process.env.TRIO_BRIDGE_PORT || '50051' },
      session: { type: 'string', default: process.env.TRIO_BRIDGE_SESSION },
      set: { type: 'string' },
      source: { type: 'string', default: 'node-example' },
      changes: { type: 'string', default: '1' },
    },
  });
  const changes = Number(values.changes);
  const set = values.set === undefined || values.set.includes('=');
  if (!values.session || !Number.isInteger(changes) || changes < 1 || !set) {
    throw new Error('a session is required; --changes is a whole number from 1; --set is NAME=VALUE');
  }
  return { ...values, changes };
}

async function main() {
  let args;
  try {
    args = options();
  } catch (error) {
    console.error(`${error.message}\n${USAGE}`);
    return 2;
  }
  const client = new UnifiedBridge(`${args.host}:${args.port}`, grpc.credentials.createInsecure());
  const setVariable = promisify(client.SetVariable.bind(client));
  // No variable_identifiers: every variable of the session, and those registered later.
  const call = client.WatchVariables({ session_id: args.session, include_initial_values: true });
  const typeOf = new Map(); // variable name → its type, learned from the updates
  let changes = 0;
  try {
    for await (const update of call) {
      if (update.update_type === 'heartbeat') continue; // the stream is alive and nothing changed
      if (update.update_type === 'synced') {
        console.log('synced'); // every current value is above; changes follow
        if (args.set) {
          const [name, text] = args.set.split(/=(.*)/s);
          if (!typeOf.has(name)) throw new Error(`the session has no variable ${JSON.stringify(name)}`);
          const value = pack(typeOf.get(name), text);
          const write = { session_id: args.session, variable_identifier: name, value, source: args.source };
          await setVariable(write);
        }
        continue;
      }
      if (update.variable === null) { // a variable_deleted on resume: only its id
        console.log(`${update.update_type} ${update.variable_id}`);
        continue;
      }
      typeOf.set(update.variable.name, update.variable.type);
      let value = unpack(update.variable.value);
      if (update.old_value !== null) value = `${unpack(update.old_value)} -> ${value}`;
      const { update_type: kind, update_source: source } = update;
      console.log(`${kind} ${update.variable.name}: ${value} (${source}, ${utc(update.timestamp)})`);
      if (update.update_type === 'value_change' && ++changes === args.changes) break;
    }
    return 0;
  } catch (error) {
    if (error.code === undefined) { // not a status: a --set the session cannot take
      console.error(error.message);
      return 1;
    }
    console.error(`${grpc.status[error.code]}: ${error.details}`);
    // On RESOURCE_EXHAUSTED (fell behind) and UNAVAILABLE (shutdown), where to resume from: pass
    // them back as the next request's resume_versions (a JSON object) and resume_revision.
    for (const key of ['trio-bridge-resume-versions', 'trio-bridge-resume-revision']) {
      const [trailer] = error.metadata ? error.metadata.get(key) : [];
      if (trailer !== undefined) console.error(`${key}: ${trailer}`);
    }
    return 1;
  } finally {
    call.cancel(); // ends the stream on the server too (nothing happens if it has ended)
    client.close();
  }
}

main().then((code) => { process.exitCode = code; });
