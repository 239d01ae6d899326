// Postgres.js (`postgres`) against the proxy: one scenario per run, one JSON document on stdout.
//   node postgresjs_driver.mjs CASE [DATABASE_URL]   (else $DATABASE_URL; $DRIVER names the rows it writes)
// Run by tests/e2e/test_proxy_drivers.py; the result shapes are the same for every driver there.
// Postgres.js prepares every parameterized query as a named statement (prepare: true, the default)
// and sends Parse/Bind/Describe/Execute/Sync pipelined. TLS: verification on, with the CA the
// connection string names (pg_tls.mjs: Postgres.js reads sslmode from a URL but not sslrootcert).
import postgres from 'postgres'
import { postgresjsTls } from './pg_tls.mjs'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'

const [caseName, urlArg] = process.argv.slice(2)
const DATABASE_URL = urlArg || process.env.DATABASE_URL
const DRIVER = process.env.DRIVER || 'postgres.js'
const LARGE_SQL = "select repeat('x', 1000) || i as s from generate_series(1, 10000) i"

const TLS = postgresjsTls(DATABASE_URL)

function connect (options = {}) {
  return postgres(TLS.url, { ...TLS.options, max: 1, connect_timeout: 10, onnotice: () => {}, ...options })
}

async function withSql (fn, options) {
  const sql = connect(options)
  try { return await fn(sql) } finally { await sql.end({ timeout: 5 }) }
}

async function sqlstate (promise) {
  try { await promise } catch (e) { return e.code || `no code: ${e.message}` }
  return null
}

const cases = {
  basic: () => withSql(async sql => {
    const [{ one }] = await sql`select 1 as one`.simple() // simple query protocol
    const multi = await sql.unsafe("select 1 as a; select 'two' as b", [], { simple: true })
    const [{ sum }] = await sql`select ${2}::int + ${3}::int as sum`
    const [{ t }] = await sql`select ${'héllo ✓'}::text as t`
    return { one, sum, text: t, multi: [multi[0][0].a, multi[1][0].b] }
  }),

  prepared: async () => {
    const clients = [0, 1, 2, 3].map(() => connect())
    try {
      // Hold a transaction on every client at once: the pool then has >= 4 warm server connections.
      let started = 0
      let release
      const allStarted = new Promise(resolve => { release = resolve })
      await Promise.all(clients.map(sql => sql.begin(async tx => {
        await tx`select pg_backend_pid()`
        if (++started === clients.length) release()
        await allStarted
      })))
      const pids = new Set()
      let executions = 0
      let correct = 0
      await Promise.all(clients.map(async sql => {
        for (let i = 0; i < 60; i++) {
          const [r] = await sql`select ${i}::int * 2 as v, pg_backend_pid() as pid /* postgres.js */`
          executions++
          if (r.v === 2 * i) correct++
          pids.add(r.pid)
        }
      }))
      return { executions, correct, pids: pids.size, clients: clients.length }
    } finally {
      await Promise.all(clients.map(sql => sql.end({ timeout: 5 })))
    }
  },

  transaction: () => withSql(async sql => {
    const count = async () => Number((await sql`select count(*) as n from drv_rows where driver = ${DRIVER}`)[0].n)
    await sql`delete from drv_rows where driver = ${DRIVER}`
    let inside = null
    const rolledBack = new Error('roll back')
    try {
      await sql.begin(async tx => {
        await tx`insert into drv_rows (driver, id, v) values (${DRIVER}, 1, 'rolled back')`
        inside = Number((await tx`select count(*) as n from drv_rows where driver = ${DRIVER}`)[0].n)
        throw rolledBack
      })
    } catch (e) {
      if (e !== rolledBack) throw e
    }
    const afterRollback = await count()
    await sql.begin(tx => tx`insert into drv_rows (driver, id, v) values (${DRIVER}, 2, 'kept')`)
    return { inside, after_rollback: afterRollback, committed: await count() }
  }),

  error: () => withSql(async sql => {
    const simple = await sqlstate(sql`select 1/0`.simple())
    const extended = await sqlstate(sql`select ${1}::int / ${0}::int`)
    const named = await sqlstate(sql`select ${1}::int / ${0}::int as q`)
    const [{ q: namedAgain }] = await sql`select ${6}::int / ${3}::int as q`
    let inTxn = null
    let aborted = null
    await sqlstate(sql.begin(async tx => {
      inTxn = await sqlstate(tx`select 1/0`)
      aborted = await sqlstate(tx`select 1`)
      throw new Error('roll back')
    }))
    const [{ v: after }] = await sql`select 42 as v`
    return { simple, extended, named, named_again: namedAgain, in_txn: inTxn, aborted, after }
  }),

  large: () => withSql(async sql => {
    const rows = await sql.unsafe(LARGE_SQL)
    let bytes = 0
    for (const row of rows) bytes += row.s.length
    return { rows: rows.length, bytes }
  }),

  copy: () => withSql(async sql => {
    await sql`delete from drv_copy where driver = ${DRIVER}`
    const lines = []
    for (let n = 1; n <= 1000; n++) lines.push(`${DRIVER}\t${n}\trow-${n}\n`)
    const writable = await sql`copy drv_copy (driver, n, s) from stdin`.writable()
    await pipeline(Readable.from(lines), writable)
    const [{ n: copiedIn }] = await sql`select count(*)::int as n from drv_copy where driver = ${DRIVER}`
    const readable = await sql.unsafe(`copy (select n, s from drv_copy where driver = '${DRIVER}' order by n) to stdout`).readable()
    const chunks = []
    for await (const chunk of readable) chunks.push(chunk)
    const rows = Buffer.concat(chunks).toString('utf8').split('\n').filter(Boolean).map(l => l.split('\t'))
    const [{ v: after, pid }] = await sql`select 1 as v, pg_backend_pid() as pid`
    return { pid, copied_in: copiedIn, out_rows: rows.length, sum: rows.reduce((s, r) => s + Number(r[0]), 0), last: rows.at(-1)?.[1], after }
  }),

  cancel: () => withSql(async sql => {
    const started = Date.now()
    const query = sql`select pg_sleep(30)`
    setTimeout(() => query.cancel(), 1000) // a CancelRequest on a new connection
    const code = await sqlstate(query)
    const seconds = (Date.now() - started) / 1000
    const [{ v: after }] = await sql`select 1 as v`
    return { code, seconds, after }
  })
}

const run = cases[caseName]
if (!run) {
  console.error(`unknown case ${caseName}; one of ${Object.keys(cases).join(', ')}`)
  process.exit(2)
}
try {
  console.log(JSON.stringify(await run()))
} catch (e) {
  console.error(`${caseName} failed: ${e.code ? `[${e.code}] ` : ''}${e.stack || e}`)
  process.exit(1)
}
