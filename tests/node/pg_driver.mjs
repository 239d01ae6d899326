// node-postgres (`pg`) against the proxy: one scenario per run, one JSON document on stdout.
//   node pg_driver.mjs CASE [DATABASE_URL]       (else $DATABASE_URL; $DRIVER names the rows it writes)
// Run by tests/e2e/test_proxy_drivers.py; the result shapes are the same for every driver there.
//
// TLS: the connection string verbatim. It says sslmode=verify-full with the edge's CA as
// sslrootcert, which node-postgres reads from the URL itself: verification is on.
import pg from 'pg'
import copyStreams from 'pg-copy-streams'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'

const [caseName, urlArg] = process.argv.slice(2)
const DATABASE_URL = urlArg || process.env.DATABASE_URL
const DRIVER = process.env.DRIVER || 'node-pg'
const LARGE_SQL = "select repeat('x', 1000) || i as s from generate_series(1, 10000) i"

function config () {
  return { connectionString: DATABASE_URL, connectionTimeoutMillis: 10000 }
}

async function connect () {
  const c = new pg.Client(config())
  c.on('error', () => {}) // reported through the query promises
  await c.connect()
  return c
}

async function withClient (fn) {
  const c = await connect()
  try { return await fn(c) } finally { await c.end() }
}

async function sqlstate (promise) {
  try { await promise } catch (e) { return e.code || `no code: ${e.message}` }
  return null
}

const cases = {
  basic: () => withClient(async c => {
    const one = (await c.query('select 1 as one')).rows[0].one // simple query protocol
    const multi = await c.query("select 1 as a; select 'two' as b") // several statements, one Query
    const sum = (await c.query('select $1::int + $2::int as sum', [2, 3])).rows[0].sum // extended, unnamed
    const text = (await c.query('select $1::text as t', ['héllo ✓'])).rows[0].t
    return { one, sum, text, multi: [multi[0].rows[0].a, multi[1].rows[0].b] }
  }),

  prepared: async () => {
    const clients = await Promise.all([0, 1, 2, 3].map(() => connect()))
    try {
      // Hold a transaction on every client at once: the pool then has >= 4 warm server connections.
      let started = 0
      let release
      const allStarted = new Promise(resolve => { release = resolve })
      await Promise.all(clients.map(async c => {
        await c.query('begin')
        await c.query('select pg_backend_pid()')
        if (++started === clients.length) release()
        await allStarted
        await c.query('commit')
      }))
      const pids = new Set()
      let executions = 0
      let correct = 0
      await Promise.all(clients.map(async c => {
        for (let i = 0; i < 60; i++) {
          const r = await c.query({ name: 'hd_drv_prep', text: 'select $1::int * 2 as v, pg_backend_pid() as pid /* node-pg */', values: [i] })
          executions++
          if (r.rows[0].v === 2 * i) correct++
          pids.add(r.rows[0].pid)
        }
      }))
      return { executions, correct, pids: pids.size, clients: clients.length }
    } finally {
      await Promise.all(clients.map(c => c.end()))
    }
  },

  transaction: () => withClient(async c => {
    await c.query('delete from drv_rows where driver = $1', [DRIVER])
    await c.query('begin')
    await c.query("insert into drv_rows (driver, id, v) values ($1, 1, 'rolled back')", [DRIVER])
    const inside = Number((await c.query('select count(*) as n from drv_rows where driver = $1', [DRIVER])).rows[0].n)
    await c.query('rollback')
    const afterRollback = Number((await c.query('select count(*) as n from drv_rows where driver = $1', [DRIVER])).rows[0].n)
    await c.query('begin')
    await c.query("insert into drv_rows (driver, id, v) values ($1, 2, 'kept')", [DRIVER])
    await c.query('commit')
    const committed = Number((await c.query('select count(*) as n from drv_rows where driver = $1', [DRIVER])).rows[0].n)
    return { inside, after_rollback: afterRollback, committed }
  }),

  error: () => withClient(async c => {
    const simple = await sqlstate(c.query('select 1/0'))
    const extended = await sqlstate(c.query('select $1::int / $2::int', [1, 0]))
    const named = await sqlstate(c.query({ name: 'hd_drv_div', text: 'select $1::int / $2::int as q', values: [1, 0] }))
    const namedAgain = (await c.query({ name: 'hd_drv_div', text: 'select $1::int / $2::int as q', values: [6, 3] })).rows[0].q
    await c.query('begin')
    const inTxn = await sqlstate(c.query('select 1/0'))
    const aborted = await sqlstate(c.query('select 1'))
    await c.query('rollback')
    const after = (await c.query('select 42 as v')).rows[0].v
    return { simple, extended, named, named_again: namedAgain, in_txn: inTxn, aborted, after }
  }),

  large: () => withClient(async c => {
    const r = await c.query(LARGE_SQL)
    let bytes = 0
    for (const row of r.rows) bytes += row.s.length
    return { rows: r.rows.length, bytes }
  }),

  copy: () => withClient(async c => {
    await c.query('delete from drv_copy where driver = $1', [DRIVER])
    const lines = []
    for (let n = 1; n <= 1000; n++) lines.push(`${DRIVER}\t${n}\trow-${n}\n`)
    const copyIn = c.query(copyStreams.from('copy drv_copy (driver, n, s) from stdin'))
    await pipeline(Readable.from(lines), copyIn)
    const copiedIn = copyIn.rowCount
    const chunks = []
    const out = c.query(copyStreams.to(`copy (select n, s from drv_copy where driver = '${DRIVER}' order by n) to stdout`))
    await pipeline(out, new Writable({ write (chunk, _enc, cb) { chunks.push(chunk); cb() } }))
    const rows = Buffer.concat(chunks).toString('utf8').split('\n').filter(Boolean).map(l => l.split('\t'))
    const { v: after, pid } = (await c.query('select 1 as v, pg_backend_pid() as pid')).rows[0]
    return { pid, copied_in: copiedIn, out_rows: rows.length, sum: rows.reduce((s, r) => s + Number(r[0]), 0), last: rows.at(-1)?.[1], after }
  }),

  cancel: () => withClient(async c => {
    const started = Date.now()
    const query = new pg.Query('select pg_sleep(30)')
    const done = new Promise(resolve => {
      query.on('error', e => resolve(e.code || e.message))
      query.on('end', () => resolve(null))
    })
    c.query(query)
    setTimeout(() => new pg.Client(config()).cancel(c, query), 1000) // a CancelRequest on a new connection
    const code = await done
    const seconds = (Date.now() - started) / 1000
    const after = (await c.query('select 1 as v')).rows[0].v
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
