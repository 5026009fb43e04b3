// A specfleet gRPC client in Node (@grpc/grpc-js + @grpc/proto-loader), the way a
// microservice in another language would call the cluster. It loads the .proto
// files at run time (no generated code), makes four calls and prints one JSON
// object for tests/clients/test_node_client.py to check:
//
//   generate     Generate: the whole completion in one response
//   stream       GenerateStream: every message, in order
//   health       grpc.health.v1 Check for the whole server ("")
//   unknownModel Generate for a model the server does not serve: the error status
//
// Usage: node client.js ADDRESS PROTOS_ROOT MODEL PROMPT MAX_TOKENS

"use strict";

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEADLINE_MS = 120000; // every call gets a deadline: a hung server fails the test, never hangs it

// enums as names ("LENGTH", "SERVING"), int64 token ids as JS numbers (ids are far below 2^53)
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

function loadPackage(protoFile, includeDir) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(protoFile, { ...LOADER_OPTIONS, includeDirs: [includeDir] }));
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline() }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function collectStream(client, request) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client.GenerateStream(request, { deadline: deadline() });
    call.on("data", (message) => messages.push(message));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

function statusOf(error) {
  return { code: error.code, name: grpc.status[error.code], details: error.details };
}

async function main([address, protosRoot, model, prompt, maxTokens]) {
  const specfleet = loadPackage("specfleet/v1/generation.proto", protosRoot).specfleet.v1;
  const health = loadPackage("health.proto", __dirname).grpc.health.v1;
  const credentials = grpc.credentials.createInsecure();
  const generation = new specfleet.Generation(address, credentials);
  const healthClient = new health.Health(address, credentials);

  // temperature 0: greedy, so the test can compare with the target's own greedy decoding
  const request = { model, text: prompt, max_tokens: Number(maxTokens), temperature: 0 };
  const generate = await unary(generation, "Generate", request);
  const stream = await collectStream(generation, request);
  const healthCheck = await unary(healthClient, "Check", { service: "" });
  const unknownModel = await unary(generation, "Generate", { ...request, model: "no-such-model" }).then(
    (response) => ({ unexpectedResponse: response }),
    statusOf,
  );

  generation.close();
  healthClient.close();
  return {
    generate: { token_ids: generate.token_ids, text: generate.text, finish_reason: generate.finish_reason },
    stream: stream.map((m) => ({ token_ids: m.token_ids, text: m.text, finish_reason: m.finish_reason })),
    health: healthCheck.status,
    unknownModel,
  };
}

main(process.argv.slice(2)).then(
  (report) => console.log(JSON.stringify(report)),
  (error) => {
    console.error(`node client failed: ${error.stack || error}`);
    process.exit(1);
  },
);
