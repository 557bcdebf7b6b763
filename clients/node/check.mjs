#!/usr/bin/env node
// A Node.js client of numbersvc: calls every read RPC, provokes one rich error and, only with
// --rent, rents one number, then prints one JSON object with what it saw. It asserts nothing
// itself: tests/polyglot/test_node_client.py compares the output with what the Python client
// sees.
//
//   node clients/node/check.mjs --target 127.0.0.1:50051 [--rent [--request-id UUID]]
//       [--deadline-seconds 10]
//
// --rent SPENDS MONEY against a server backed by Plivo (on the sandbox it rents nothing real):
// without it the rent is skipped ("rent": null).
//
// It loads the contract from protos/ at run time (@grpc/proto-loader), so it needs no
// generated code. Exit status: 0 when every call behaved as a call (an RPC error included
// in the JSON), 1 on a crash or a transport failure.

import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const PROTOS = fileURLToPath(new URL("../../protos/", import.meta.url));

// keepCase: the JSON uses the proto's field names. longs as strings: int64 (Money.units,
// stock) stays exact. enums as names. defaults: zero values appear instead of vanishing.
const DECODE_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true };

// A small search: a handful of pages when walked five groups at a time.
const FILTER = { region_code: "US", region: "NY" };
const PAGE_SIZE = 5;

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    rent: { type: "boolean", default: false },
    "request-id": { type: "string", default: randomUUID() },
    "deadline-seconds": { type: "string", default: "10" },
  },
});

const definition = protoLoader.loadSync("numbersvc/v1/number_groups.proto", {
  ...DECODE_OPTIONS,
  includeDirs: [PROTOS],
});
const { NumberGroupService } = grpc.loadPackageDefinition(definition).numbersvc.v1;
const client = new NumberGroupService(args.target, grpc.credentials.createInsecure());

// The rich error model: google.rpc.Status and its detail types, decoded with protobufjs.
// google/protobuf/{any,duration}.proto come bundled with protobufjs.
const richTypes = new protobuf.Root();
richTypes.resolvePath = (_origin, target) => PROTOS + target;
richTypes.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], {
  keepCase: true,
});
const Status = richTypes.lookupType("google.rpc.Status");

/** Call options: a fresh deadline for each call. */
function callOptions() {
  return { deadline: Date.now() + Number(args["deadline-seconds"]) * 1000 };
}

/** A unary call as a promise. */
function unary(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, callOptions(), (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/** Every message of a server stream, plus the status the stream ended with. */
async function serverStream(method, request) {
  const call = client[method](request, callOptions());
  const status = new Promise((resolve) => call.on("status", resolve));
  const messages = [];
  for await (const message of call) messages.push(message); // an RPC error throws here
  return { messages, status: await status };
}

/** A google.protobuf.Any as an object with its type name under "@type". */
function unpackAny({ type_url, value }) {
  const typeName = type_url.slice(type_url.lastIndexOf("/") + 1);
  const type = richTypes.lookupType(typeName);
  return { "@type": typeName, ...type.toObject(type.decode(value), DECODE_OPTIONS) };
}

/** What a failed call carried: code, message, and the decoded grpc-status-details-bin. */
function describeError(error) {
  if (error.code === undefined) throw error; // not an RPC error: a bug here, crash loudly
  const [detailsBin] = error.metadata.get("grpc-status-details-bin");
  const status = detailsBin ? Status.decode(detailsBin) : null;
  return {
    code: grpc.status[error.code],
    code_number: error.code,
    details: error.details,
    status: status && { code: status.code, message: status.message },
    status_details: status ? status.details.map(unpackAny) : [],
  };
}

/** Runs `call` and returns its result, or describes the RPC error it failed with. */
async function attempt(call) {
  try {
    return { ok: true, value: await call() };
  } catch (error) {
    return { ok: false, error: describeError(error) };
  }
}

async function main() {
  const seen = { target: args.target };

  // ListNumberGroups: the first page of the small search.
  const page = await unary("ListNumberGroups", { filter: FILTER, page_size: PAGE_SIZE });
  seen.list = {
    total_size: page.total_size,
    group_ids: page.number_groups.map((group) => group.group_id),
    next_page_token: page.next_page_token,
  };

  // StreamNumberGroups: the whole search, one message per page, in order.
  const { messages, status } = await serverStream("StreamNumberGroups", {
    filter: FILTER,
    page_size: PAGE_SIZE,
  });
  seen.stream = {
    status: grpc.status[status.code],
    messages: messages.map((message) => ({
      group_ids: message.number_groups.map((group) => group.group_id),
      total_size: message.total_size,
      next_page_token: message.next_page_token,
    })),
  };

  // GetNumberGroup: the first group listed, with its exact prices.
  const [first] = page.number_groups;
  const { number_group: group } = await unary("GetNumberGroup", { group_id: first.group_id });
  seen.get = group;

  // RentNumbers, only when asked: one number from the first group in stock, under the
  // caller's request id. It spends money on a Plivo-backed server.
  seen.rent = null;
  if (args.rent) {
    const inStock = page.number_groups.find((candidate) => Number(candidate.stock) > 0);
    const { order } = await unary("RentNumbers", {
      group_id: inStock.group_id,
      quantity: 1,
      request_id: args["request-id"],
    });
    seen.rent = order;
  } else {
    process.stderr.write("not renting: pass --rent to rent one number (spends money on Plivo)\n");
  }

  // One rich error: an invalid region code is INVALID_ARGUMENT with a BadRequest.
  const invalid = await attempt(() => unary("ListNumberGroups", { filter: { region_code: "ZZ" } }));
  seen.invalid_region = invalid.ok ? { unexpected_success: invalid.value } : invalid.error;

  return seen;
}

try {
  process.stdout.write(`${JSON.stringify(await main())}\n`);
} finally {
  client.close();
}
