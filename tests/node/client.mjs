// A Node.js caller of kms-sidecar: @grpc/grpc-js with stubs loaded at run
// time from proto/kms_sidecar/v1/kms_sidecar.proto, cross-checked with the
// official AWS Encryption SDK for JavaScript (@aws-crypto/client-node) using
// the same raw AES key as the sidecar's local keyring.
//
// Driven by tests/python/test_node.py, which passes one JSON argument:
//   { target, keyFile, keyNamespace, keyName, payloadFile, outDir }
// and checks the JSON this script prints on stdout. The script reports what
// it saw (digests, codes, raw status details); the Python side decides.

import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import {
  AlgorithmSuiteIdentifier,
  CommitmentPolicy,
  RawAesKeyringNode,
  RawAesWrappingSuiteIdentifier,
  buildClient,
} from '@aws-crypto/client-node';

const args = JSON.parse(process.argv[2]);
const repo = fileURLToPath(new URL('../..', import.meta.url));
const loaderOptions = { keepCase: true, longs: String, defaults: true };

const keyService = grpc.loadPackageDefinition(
  protoLoader.loadSync('kms_sidecar/v1/kms_sidecar.proto', {
    ...loaderOptions,
    includeDirs: [join(repo, 'proto')],
  }),
).kms_sidecar.v1.KeyService;

// grpc.health.v1 (the two messages and the one method this test calls).
const health = grpc.loadPackageDefinition(
  protoLoader.fromJSON(
    {
      nested: {
        grpc: { nested: { health: { nested: { v1: { nested: {
          HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
          HealthCheckResponse: {
            fields: { status: { type: 'ServingStatus', id: 1 } },
            nested: {
              ServingStatus: {
                values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 },
              },
            },
          },
          Health: {
            methods: {
              Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' },
            },
          },
        } } } } } },
      },
    },
    { ...loaderOptions, enums: String },
  ),
).grpc.health.v1.Health;

const credentials = grpc.credentials.createInsecure();
const client = new keyService(args.target, credentials);
const healthClient = new health(args.target, credentials);

const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');

function unary(stub, method, request) {
  return new Promise((resolve, reject) => {
    stub[method](request, { deadline: Date.now() + 30_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

// A bidirectional stream: writes the messages (respecting backpressure),
// half-closes, and collects the replies.
function bidi(method, messages) {
  return new Promise((resolve, reject) => {
    const call = client[method]({ deadline: Date.now() + 60_000 });
    const replies = [];
    call.on('data', (reply) => replies.push(reply));
    call.on('error', reject);
    call.on('end', () => resolve(replies));
    (async () => {
      for (const message of messages) {
        if (!call.write(message)) {
          await new Promise((drained) => call.once('drain', drained));
        }
      }
      call.end();
    })().catch(reject);
  });
}

// What a failed call carried: code, message, and the raw
// grpc-status-details-bin (a google.rpc.Status) for the caller to decode.
function failure(err) {
  const details = err.metadata?.get('grpc-status-details-bin')?.[0];
  return {
    code: grpc.status[err.code],
    message: err.details,
    status_details_b64: details ? Buffer.from(details).toString('base64') : null,
  };
}

function chunks(bytes, size) {
  const out = [];
  for (let i = 0; i < bytes.length; i += size) out.push(bytes.subarray(i, i + size));
  return out;
}

const keyring = new RawAesKeyringNode({
  keyName: args.keyName,
  keyNamespace: args.keyNamespace,
  unencryptedMasterKey: new Uint8Array(readFileSync(args.keyFile)),
  wrappingSuite: RawAesWrappingSuiteIdentifier.AES256_GCM_IV12_TAG16_NO_PADDING,
});
const { encrypt, decrypt } = buildClient(CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT);
const payload = readFileSync(args.payloadFile);
const context = { lang: 'node', purpose: 'interop' };
const report = {};

// Health: overall (liveness) and the KeyService (readiness).
report.health = {};
for (const service of ['', 'kms_sidecar.v1.KeyService']) {
  report.health[service] = (await unary(healthClient, 'Check', { service })).status;
}

const dataKey = await unary(client, 'GenerateDataKey', { number_of_bytes: 32 });
report.generate = { key_id: dataKey.key_id, plaintext_len: dataKey.plaintext.length };

// Sidecar Wrap -> JS ESDK decrypt.
const wrapped = await unary(client, 'Wrap', { plaintext: payload, encryption_context: context });
writeFileSync(join(args.outDir, 'wrap.esdk'), wrapped.envelope);
{
  const { plaintext, messageHeader } = await decrypt(keyring, wrapped.envelope);
  report.wrap = {
    key_id: wrapped.key_id,
    js_decrypt_sha256: sha256(plaintext),
    js_suite_id: messageHeader.suiteId,
    js_context: messageHeader.encryptionContext,
  };
}

// JS ESDK encrypt (committing suite, 4 KiB frames) -> sidecar Unwrap.
const { result: jsEnvelope } = await encrypt(keyring, payload, {
  encryptionContext: context,
  suiteId: AlgorithmSuiteIdentifier.ALG_AES256_GCM_IV12_TAG16_HKDF_SHA512_COMMIT_KEY,
  frameLength: 4096,
});
{
  const opened = await unary(client, 'Unwrap', {
    envelope: jsEnvelope,
    encryption_context: context,
  });
  report.unwrap = {
    key_id: opened.key_id,
    plaintext_sha256: sha256(opened.plaintext),
    context: opened.encryption_context,
  };
}

// WrapStream in 64 KiB chunks -> JS ESDK decrypt; JS envelope -> UnwrapStream
// in 50,000-byte chunks (not aligned with the frames).
{
  const parts = chunks(payload, 64 * 1024).map((chunk, i) =>
    i === 0 ? { encryption_context: context, frame_length: 65536, chunk } : { chunk },
  );
  const replies = await bidi('WrapStream', parts);
  const envelope = Buffer.concat(replies.map((r) => r.chunk));
  writeFileSync(join(args.outDir, 'wrapstream.esdk'), envelope);
  const { plaintext } = await decrypt(keyring, envelope);
  report.wrap_stream = {
    key_id: replies.find((r) => r.key_id)?.key_id ?? null,
    replies: replies.length,
    js_decrypt_sha256: sha256(plaintext),
  };
}
{
  const parts = chunks(jsEnvelope, 50_000).map((chunk, i) =>
    i === 0 ? { encryption_context: context, chunk } : { chunk },
  );
  const replies = await bidi('UnwrapStream', parts);
  report.unwrap_stream = {
    key_id: replies.find((r) => r.key_id)?.key_id ?? null,
    plaintext_sha256: sha256(Buffer.concat(replies.map((r) => r.chunk))),
  };
}

// Failures: a wrong context (unary and streaming), a tampered envelope, an
// unknown key.
report.errors = {};
const attempts = {
  wrong_context: () =>
    unary(client, 'Unwrap', { envelope: jsEnvelope, encryption_context: { lang: 'node' } }),
  wrong_context_stream: () =>
    bidi('UnwrapStream', [{ encryption_context: { lang: 'golang' }, chunk: jsEnvelope }]),
  tampered: () => {
    const bad = Buffer.from(wrapped.envelope);
    bad[bad.length - 1] ^= 1;
    return unary(client, 'Unwrap', { envelope: bad, encryption_context: context });
  },
  unknown_key: () => unary(client, 'Wrap', { key_id: 'no-such-key', plaintext: payload }),
};
for (const [name, attempt] of Object.entries(attempts)) {
  try {
    await attempt();
    report.errors[name] = { code: 'OK' };
  } catch (err) {
    report.errors[name] = failure(err);
  }
}

client.close();
healthClient.close();
process.stdout.write(`${JSON.stringify(report)}\n`);
