// mysql2 in its DEFAULT mode through the hd MySQL proxy: isolation checks for
// tests/e2e/test_mysql_isolation.py, one JSON document on stdout.
//   node mysql_isolation.mjs PROXY_URL DIRECT_URL N ROOT_URL   (N: how many next clients must share the setter's
//        origin connection; ROOT_URL: an admin connection to MariaDB that takes away other origin connections)
//   node mysql_isolation.mjs --child PROXY_URL WHO        (opens a transaction, inserts, prints its CONNECTION_ID(), waits to be killed)
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import mysql from 'mysql2/promise'

function options (url) {
  const u = new URL(url)
  return {
    host: u.hostname.replace(/^\[|\]$/g, ''),
    port: Number(u.port || 3306),
    user: decodeURIComponent(u.username),
    password: decodeURIComponent(u.password),
    database: decodeURIComponent(u.pathname.slice(1)) || undefined,
    connectTimeout: 10000
  }
}

async function withConn (url, fn) {
  const c = await mysql.createConnection(options(url))
  try { return await fn(c) } finally { await c.end() }
}

if (process.argv[2] === '--child') {
  const c = await mysql.createConnection(options(process.argv[3]))
  await c.beginTransaction()
  await c.query('INSERT INTO iso (who, v) VALUES (?, ?)', [process.argv[4], 'never committed'])
  const [r] = await c.query('SELECT CONNECTION_ID() AS id')
  console.log(String(r[0].id))
  await new Promise(resolve => setTimeout(resolve, 600000))
  process.exit(0)
}

const [proxyUrl, directUrl] = [process.argv[2], process.argv[3]]
const N = Number(process.argv[4] || 20)
const out = { collation: {}, version: {} }

for (const [name, url] of [['proxy', proxyUrl], ['direct', directUrl]]) {
  await withConn(url, async c => {
    const [r] = await c.query("SELECT 'ß' = 'ss' AS sz, 'Å' = 'A' AS ring, @@collation_connection AS coll")
    out.collation[name] = { sz: Number(r[0].sz), ring: Number(r[0].ring), coll: r[0].coll }
    out.version[name] = c.connection._handshakePacket.serverVersion
  })
}

// rollback leaves nothing
await withConn(proxyUrl, async c => {
  await c.beginTransaction()
  await c.query("INSERT INTO iso (who, v) VALUES ('node-rb', 'x')")
  await c.rollback()
})
out.rolled_back = await withConn(directUrl, async c => {
  const [r] = await c.query("SELECT COUNT(*) AS n FROM iso WHERE who = 'node-rb'")
  return Number(r[0].n)
})

// a client process killed mid-transaction
const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--child', proxyUrl, 'node-killed'],
  { stdio: ['ignore', 'pipe', 'inherit'] })
out.killed_thread = await new Promise((resolve, reject) => {
  child.stdout.once('data', d => resolve(Number(String(d).trim())))
  child.once('exit', code => reject(new Error(`child exited ${code}`)))
  setTimeout(() => reject(new Error('child did not start')), 20000).unref()
})
child.kill('SIGKILL')
await new Promise(resolve => child.once('exit', resolve))

// state set by one client, then the next clients on the same origin connection
await withConn(proxyUrl, async c => {
  await c.query("SET @leak = 'secret'")
  await c.query("SET time_zone = '+05:00'")
  await c.query('CREATE TEMPORARY TABLE tmp_node (i INT)')
  await c.query("SELECT GET_LOCK('hd-node-lock', 0)")
  await c.query('SET autocommit = 0')
  await c.query("INSERT INTO iso (who, v) VALUES ('node-setter', 'x')")
  await c.query('COMMIT')
  const [r] = await c.query('SELECT CONNECTION_ID() AS id, @leak AS leak')
  out.setter_thread = Number(r[0].id)
  out.setter_sees = r[0].leak
})
out.next = []
const root = await mysql.createConnection(options(process.argv[5]))
for (let attempt = 0; attempt < 3 * N && out.next.filter(p => p.thread === out.setter_thread).length < N; attempt++) {
  const probe = await withConn(proxyUrl, async c => {
    const [r] = await c.query("SELECT CONNECTION_ID() AS thread, @leak AS leak, @@time_zone AS tz, @@collation_connection AS coll, " +
      "IS_FREE_LOCK('hd-node-lock') AS lk, @@autocommit AS ac, LAST_INSERT_ID() AS lid FROM one")
    let tmp = 0
    try { await c.query('SELECT * FROM tmp_node') } catch (e) { tmp = e.errno }
    const row = r[0]
    return {
      thread: Number(row.thread),
      state: { leak: row.leak, tz: row.tz, coll: row.coll, lock: Number(row.lk), ac: Number(row.ac), lid: Number(row.lid) },
      tmp
    }
  })
  out.next.push(probe)
  if (probe.thread !== out.setter_thread) {
    // the setter's connection was still being reset and another served: take that one away
    try { await root.query(`KILL CONNECTION ${probe.thread}`) } catch (e) {}
  }
}
await root.end()
console.log(JSON.stringify(out))
