// A DIDComm v2 edge agent on SICPA's didcomm-rust (npm didcomm-node), for Dovecote's tests.
//
// The Python test drives it step by step: one JSON command per stdin line, one JSON answer
// per stdout line ({"ok": true, ...} or {"ok": false, "error": ...}). Crypto, DID
// resolution, HTTP and WebSocket all happen here, so Dovecote meets an implementation that
// shares no code with it. The only glue written here is did:peer:2 (create + resolve),
// which didcomm-node leaves to the application.
import { Message } from "didcomm-node";
import { generateKeyPairSync, randomUUID } from "node:crypto";
import { createInterface } from "node:readline";
import WebSocket from "ws";

// ---------------------------------------------------------------- base58btc / multikey
const ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

function b58encode(bytes) {
  let n = 0n;
  for (const b of bytes) n = n * 256n + BigInt(b);
  let out = "";
  while (n > 0n) { out = ALPHABET[Number(n % 58n)] + out; n /= 58n; }
  for (const b of bytes) { if (b !== 0) break; out = "1" + out; }
  return out;
}

function b58decode(text) {
  let n = 0n;
  for (const c of text) {
    const i = ALPHABET.indexOf(c);
    if (i < 0) throw new Error("bad base58");
    n = n * 58n + BigInt(i);
  }
  const bytes = [];
  while (n > 0n) { bytes.unshift(Number(n % 256n)); n /= 256n; }
  for (const c of text) { if (c !== "1") break; bytes.unshift(0); }
  return Uint8Array.from(bytes);
}

const b64u = (buf) => Buffer.from(buf).toString("base64url");
const CODECS = { Ed25519: [0xed, 0x01], X25519: [0xec, 0x01] };

function multikey(jwk) {
  return "z" + b58encode(Uint8Array.from([...CODECS[jwk.crv], ...Buffer.from(jwk.x, "base64url")]));
}

function jwkOf(multibase) {
  const data = b58decode(multibase.slice(1));
  for (const [crv, prefix] of Object.entries(CODECS)) {
    if (data[0] === prefix[0] && data[1] === prefix[1]) {
      return { kty: "OKP", crv, x: b64u(data.slice(2)) };
    }
  }
  throw new Error("unsupported multikey");
}

// ---------------------------------------------------------------- did:peer:2
const ABBREVIATIONS = { t: "type", s: "serviceEndpoint", a: "accept", r: "routingKeys" };

function expand(value) {
  if (Array.isArray(value)) return value.map(expand);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [ABBREVIATIONS[k] ?? k, expand(v)]));
  }
  return value === "dm" ? "DIDCommMessaging" : value;
}

function peer2(signJwk, agreeJwk, services) {
  let did = `did:peer:2.V${multikey(signJwk)}.E${multikey(agreeJwk)}`;
  for (const svc of services) {
    const short = { t: "dm", s: { uri: svc.uri, a: ["didcomm/v2"], r: svc.routing_keys ?? [] } };
    did += ".S" + b64u(Buffer.from(JSON.stringify(short)));
  }
  return did;
}

function resolvePeer2(did) {
  if (!did.startsWith("did:peer:2.")) return null;
  const doc = { id: did, keyAgreement: [], authentication: [], verificationMethod: [], service: [] };
  let keys = 0;
  for (const part of did.slice("did:peer:2.".length).split(".")) {
    const purpose = part[0];
    const value = part.slice(1);
    if (purpose === "S") {
      const svc = expand(JSON.parse(Buffer.from(value, "base64url").toString()));
      const endpoint = typeof svc.serviceEndpoint === "string"
        ? { uri: svc.serviceEndpoint } : svc.serviceEndpoint;
      const index = doc.service.length;
      doc.service.push({
        id: `${did}#service${index ? "-" + index : ""}`,
        type: svc.type,
        serviceEndpoint: {
          uri: endpoint.uri, accept: endpoint.accept ?? ["didcomm/v2"],
          routing_keys: endpoint.routingKeys ?? [],
        },
      });
      continue;
    }
    keys += 1;
    const id = `${did}#key-${keys}`;
    const jwk = jwkOf(value);
    doc.verificationMethod.push({ id, type: "JsonWebKey2020", controller: did, publicKeyJwk: jwk });
    if (purpose === "E") doc.keyAgreement.push(id);
    if (purpose === "V") doc.authentication.push(id);
  }
  return doc;
}

// ---------------------------------------------------------------- agents
const secrets = new Map(); // kid -> Secret
const agents = new Map(); // name -> did

const didResolver = { resolve: async (did) => resolvePeer2(did.split("#")[0]) };
const secretsResolver = {
  get_secret: async (id) => secrets.get(id) ?? null,
  find_secrets: async (ids) => ids.filter((id) => secrets.has(id)),
};

function newAgent({ name, services = [] }) {
  const sign = generateKeyPairSync("ed25519").privateKey.export({ format: "jwk" });
  const agree = generateKeyPairSync("x25519").privateKey.export({ format: "jwk" });
  const did = peer2(sign, agree, services);
  secrets.set(`${did}#key-1`, { id: `${did}#key-1`, type: "JsonWebKey2020", privateKeyJwk: sign });
  secrets.set(`${did}#key-2`, { id: `${did}#key-2`, type: "JsonWebKey2020", privateKeyJwk: agree });
  agents.set(name, did);
  return { did };
}

function didOf(name) {
  const did = agents.get(name);
  if (!did) throw new Error(`no agent ${name}`);
  return did;
}

function plaintext({ agent, to, type, body = {}, return_route = true, headers = {} }) {
  const value = {
    id: randomUUID(), typ: "application/didcomm-plain+json", type, body,
    from: didOf(agent), to: [to], created_time: Math.floor(Date.now() / 1000), ...headers,
  };
  if (return_route) value.return_route = "all";
  return value;
}

async function pack(value, to, from) {
  const [packed] = await new Message(value).pack_encrypted(
    to, from, null, didResolver, secretsResolver, { forward: false });
  return packed;
}

function protectedHeader(packed) {
  try {
    const jwe = JSON.parse(packed);
    return JSON.parse(Buffer.from(jwe.protected, "base64url").toString());
  } catch {
    return null;
  }
}

async function unpack(packed) {
  const [msg, metadata] = await Message.unpack(packed, didResolver, secretsResolver, {});
  return { message: msg.as_value(), metadata, protected: protectedHeader(packed) };
}

async function post(url, packed) {
  const response = await fetch(url, {
    method: "POST", body: packed, headers: { "content-type": "application/didcomm-encrypted+json" },
  });
  const text = await response.text();
  const out = { status: response.status, content_type: response.headers.get("content-type") ?? "" };
  if (text && out.content_type.startsWith("application/didcomm-encrypted+json")) {
    Object.assign(out, await unpack(text));
  } else if (text) {
    try { out.json = JSON.parse(text); } catch { out.text = text; }
  }
  return out;
}

// ---------------------------------------------------------------- WebSockets
const sockets = new Map(); // id -> { ws, frames: [], waiters: [] }

function openSocket({ id, url }) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const entry = { ws, frames: [], waiters: [], closed: null };
    ws.on("message", (data) => {
      entry.frames.push(data.toString());
      entry.waiters.splice(0).forEach((w) => w());
    });
    ws.on("close", (code) => {
      entry.closed = code;
      entry.waiters.splice(0).forEach((w) => w());
    });
    ws.once("open", () => { sockets.set(id, entry); resolve({}); });
    ws.once("error", reject);
  });
}

async function nextFrame({ id, timeout = 10 }) {
  const entry = sockets.get(id);
  const deadline = Date.now() + timeout * 1000;
  while (!entry.frames.length && entry.closed === null && Date.now() < deadline) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
      entry.waiters.push(() => { clearTimeout(timer); resolve(); });
    });
  }
  if (!entry.frames.length) return { timeout: entry.closed === null, closed: entry.closed };
  const frame = entry.frames.shift();
  const header = protectedHeader(frame);
  return header ? unpack(frame) : { json: JSON.parse(frame) };
}

// ---------------------------------------------------------------- commands
const commands = {
  agent: newAgent,
  // An authcrypted request to the mediator over HTTP; the answer unpacked.
  async request(args) {
    const value = plaintext(args);
    return { id: value.id, ...(await post(args.url, await pack(value, args.to, didOf(args.agent)))) };
  },
  // Any third party: encrypt for the recipient, wrap in a forward for each routing key
  // (anoncrypt, didcomm-rust's own wrap_in_forward) and POST it to the mediator.
  async forward({ url, sender, recipient, routing_keys, type, body, id }) {
    const value = {
      id: id ?? randomUUID(), typ: "application/didcomm-plain+json", type, body,
      to: [recipient], created_time: Math.floor(Date.now() / 1000),
    };
    const from = sender ? didOf(sender) : null;
    if (from) value.from = from;
    const inner = await pack(value, recipient, from);
    const wrapped = await Message.wrap_in_forward(
      inner, {}, recipient, routing_keys, "A256cbcHs512EcdhEsA256kw", didResolver);
    return { id: value.id, protected: protectedHeader(wrapped), ...(await post(url, wrapped)) };
  },
  // Decrypt a delivery attachment (data.json or data.base64) as one of our agents.
  async open_attachment({ attachment }) {
    const data = attachment.data ?? {};
    const packed = data.json ? JSON.stringify(data.json)
      : Buffer.from(data.base64, "base64url").toString();
    return unpack(packed);
  },
  ws_open: openSocket,
  async ws_send(args) {
    const value = plaintext(args);
    sockets.get(args.id).ws.send(await pack(value, args.to, didOf(args.agent)));
    return { id: value.id };
  },
  ws_recv: nextFrame,
  async ws_close({ id }) {
    sockets.get(id)?.ws.close();
    sockets.delete(id);
    return {};
  },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const { cmd, ...args } = JSON.parse(line);
    const command = commands[cmd];
    if (!command) throw new Error(`unknown command ${cmd}`);
    answer = { ok: true, ...(await command(args)) };
  } catch (error) {
    answer = { ok: false, error: `${error?.name ?? "Error"}: ${error?.message ?? error}` };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
for (const { ws } of sockets.values()) ws.close();
