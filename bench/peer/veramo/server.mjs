// A DIDComm v2 mediator made of Veramo 7's own plugins and message handlers, for make bench
// (bench/peer/veramo.py starts it; bench/peer/README.md says what it is and is not).
//
//   node server.mjs PORT   (env VERAMO_AUTH_KEY, VERAMO_AGREEMENT_KEY: 32-byte hex seeds,
//                           VERAMO_STORE=memory|json)
//
// Prints one JSON line {"did": ..., "port": ...} once it listens on 127.0.0.1:PORT.
// POST / takes a packed DIDComm v2 message (as Veramo's remote-server MessagingRouter
// does: agent.handleMessage with save=true): 200 with the return-routed reply when a handler
// made one (mediate-grant, recipient-update-response, pickup), else 202. A message no
// handler could unpack is 400 here (MessagingRouter would answer 500).
import http from 'node:http'

import { createAgent } from '@veramo/core'
import { DataStoreJson } from '@veramo/data-store-json'
import {
  CoordinateMediationV3MediatorMessageHandler,
  DIDComm,
  DIDCommMessageHandler,
  PickupMediatorMessageHandler,
  RoutingMessageHandler,
} from '@veramo/did-comm'
import { DIDManager, MemoryDIDStore } from '@veramo/did-manager'
import { getResolver as peerResolver, PeerDIDProvider } from '@veramo/did-provider-peer'
import { DIDResolverPlugin } from '@veramo/did-resolver'
import { KeyManager, MemoryKeyStore, MemoryPrivateKeyStore } from '@veramo/key-manager'
import { KeyManagementSystem } from '@veramo/kms-local'
import { KeyValueStore } from '@veramo/kv-store'
import { MediationManagerPlugin } from '@veramo/mediation-manager'
import { MessageHandler } from '@veramo/message-handler'
import { Resolver } from 'did-resolver'

// The routing and pickup handlers keep queued forwards through the agent's IDataStore
// (dataStoreSaveMessage) and find them with IDataStoreORM (dataStoreORMGetMessages).
// Veramo's own in-memory implementation, DataStoreJson, deep-copies its whole tree on every
// save (to hand notifyUpdate the old and new trees), so its cost grows with the queue; the
// default here is a Map with the same methods, so the figure is the mediator's, not that
// copy's. VERAMO_STORE=json uses DataStoreJson. Neither is durable: a 202 means "in memory".
class MapDataStore {
  constructor() {
    this.messages = new Map()
    this.methods = {
      dataStoreSaveMessage: async ({ message }) => {
        const id = message.id ?? `${this.messages.size}`
        this.messages.set(id, { ...message, id })
        return id
      },
      dataStoreGetMessage: async ({ id }) => {
        const message = this.messages.get(id)
        if (!message) throw new Error('not_found: Message not found')
        return message
      },
      dataStoreDeleteMessage: async ({ id }) => this.messages.delete(id),
      dataStoreORMGetMessages: async (args) => select([...this.messages.values()], args),
      dataStoreORMGetMessagesCount: async (args) =>
        select([...this.messages.values()], args).length,
    }
  }
}

// The subset of Veramo's FindArgs the handlers use: where [{column, value, op: 'In'|Equal}],
// order [{column, direction}], take.
function select(rows, { where = [], order = [], take } = {}) {
  let out = rows.filter((row) =>
    where.every(({ column, value = [], op, not }) => {
      const hit = op === 'In' || !op ? value.includes(row[column]) : value[0] === row[column]
      return not ? !hit : hit
    }),
  )
  for (const { column, direction } of [...order].reverse()) {
    const sign = direction === 'DESC' ? -1 : 1
    out = out.sort((a, b) => (a[column] > b[column] ? sign : a[column] < b[column] ? -sign : 0))
  }
  return take ? out.slice(0, take) : out
}

const port = Number(process.argv[2] ?? 0)
const store =
  process.env.VERAMO_STORE === 'json'
    ? new DataStoreJson({ notifyUpdate: async () => {} })
    : new MapDataStore()
const kv = (namespace) => new KeyValueStore({ namespace, store: new Map() })

const agent = createAgent({
  plugins: [
    new KeyManager({
      store: new MemoryKeyStore(),
      kms: { local: new KeyManagementSystem(new MemoryPrivateKeyStore()) },
    }),
    new DIDManager({
      store: new MemoryDIDStore(),
      defaultProvider: 'did:peer',
      providers: { 'did:peer': new PeerDIDProvider({ defaultKms: 'local' }) },
    }),
    new DIDResolverPlugin({ resolver: new Resolver({ ...peerResolver() }) }),
    store,
    new MediationManagerPlugin(true, kv('policy'), kv('mediation'), kv('recipients')),
    new DIDComm(),
    new MessageHandler({
      messageHandlers: [
        new DIDCommMessageHandler(),
        new CoordinateMediationV3MediatorMessageHandler(),
        new RoutingMessageHandler(),
        new PickupMediatorMessageHandler(),
      ],
    }),
  ],
})

const identifier = await agent.didManagerCreate({
  provider: 'did:peer',
  options: {
    num_algo: 2,
    authPrivateKeyHex: process.env.VERAMO_AUTH_KEY,
    agreementPrivateKeyHex: process.env.VERAMO_AGREEMENT_KEY,
  },
})

let queued = 0
agent.eventBus.on('DIDCommV2Message-forwardMessageQueued', () => queued++)

async function handle(raw) {
  const message = await agent.handleMessage({
    raw,
    metaData: [{ type: 'DIDCommMessaging' }],
    save: true,
  })
  const reply = message.metaData?.find((m) => m.type === 'ReturnRouteResponse')
  if (reply?.value) {
    const { message: body, contentType } = JSON.parse(reply.value)
    return [200, contentType, body]
  }
  return [202, 'application/json', JSON.stringify({ id: message.id })]
}

// An explicit Content-Length: without it node answers chunked, which the load generator
// (bench/loadgen.py, raw HTTP/1.1) does not parse.
function reply(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(body) })
  res.end(body)
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET') {
    const stored = store.messages?.size ?? Object.keys(store.cacheTree?.messages ?? {}).length
    reply(res, 200, 'application/json', JSON.stringify({ did: identifier.did, queued, stored }))
    return
  }
  const chunks = []
  req.on('data', (chunk) => chunks.push(chunk))
  req.on('end', () => {
    handle(Buffer.concat(chunks).toString())
      .then(([status, type, body]) => reply(res, status, type, body))
      .catch((error) => reply(res, 400, 'text/plain', String(error?.message ?? error)))
  })
})
server.keepAliveTimeout = 60_000
server.listen(port, '127.0.0.1', () => {
  console.log(JSON.stringify({ did: identifier.did, port: server.address().port }))
})
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)))
