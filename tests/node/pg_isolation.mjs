// node-postgres (`pg`) in its default mode (autocommit; client.query() without values is a simple
// Query, with values an unnamed extended one) for tests/e2e/test_pg_isolation_drivers.py.
//   node pg_isolation.mjs CASE DATABASE_URL [TAG]     ($ISO_SPEC: the SQL, JSON from the test)
// CASE: rollback | hold | leak | carry | params. One JSON document on stdout (hold: one line, then it waits
// to be killed, at most 60 s). The shapes are the ones the Python drivers return there.
//
// TLS: the URL verbatim (sslmode=verify-full with the CA as sslrootcert, read by node-postgres itself).
// The driver's view of the reported parameters: node-postgres keeps none (it always speaks UTF-8);
// what it received is read from its connection's 'parameterStatus' events.
import pg from 'pg'

const [caseName, url, tag] = process.argv.slice(2)
const SPEC = JSON.parse(process.env.ISO_SPEC)

async function connect () {
  const c = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10000 })
  c.view = {}
  c.connection.on('parameterStatus', m => { c.view[m.parameterName] = m.parameterValue })
  c.on('error', () => {}) // reported through the query promises
  await c.connect()
  return c
}

const error = e => `error ${e.code}: ${String(e.message).split('\n')[0]}`
const first = async (c, sql, values) => (await c.query(sql, values)).rows[0] ?? null

async function step (c, sql) {
  try {
    const row = await first(c, sql)
    return { ok: true, pid: row?.pid ?? null }
  } catch (e) {
    return { ok: false, error: error(e) }
  }
}

async function probe (c) {
  try { return await first(c, SPEC.probe) } catch (e) { return { error: error(e) } }
}

function view (c) {
  return Object.fromEntries(SPEC.view_keys.map(k => [k, c.view[k] ?? null]))
}

async function showAll (c) {
  const out = {}
  for (const k of SPEC.show_keys) {
    try { out[k] = Object.values(await first(c, `SHOW ${k}`))[0] } catch (e) { out[k] = error(e) }
  }
  return out
}

// n new clients at once, each running one query inside a transaction (BEGIN ... COMMIT) it holds
// until all n have their answer (at most group_wait s): together they take every server connection
// of the pool, so the one client A used is among them.
function laterGroup (n) {
  const group = gate(n)
  return Promise.all(Array.from({ length: n }, async () => {
    let b
    try { b = await connect() } catch (e) { group.arrive(); return { error: 'connect: ' + error(e) } }
    try {
      let p
      try {
        await b.query('BEGIN')
        p = await probe(b)
      } catch (e) { p = { error: error(e) } }
      group.arrive()
      await group.all
      await b.query('COMMIT').catch(() => {})
      return p
    } finally {
      await b.end()
    }
  }))
}

// resolves once n have arrived, or after group_wait seconds
function gate (n) {
  let arrived = 0
  let open
  const all = new Promise(resolve => { open = resolve })
  setTimeout(open, SPEC.group_wait * 1000).unref()
  return { all, arrive () { if (++arrived === n) open() } }
}

function nextLine () {
  return new Promise((resolve, reject) => {
    let buf = ''
    process.stdin.setEncoding('utf8')
    process.stdin.on('data', d => { buf += d; if (buf.includes('\n')) { process.stdin.destroy(); resolve(buf) } })
    process.stdin.on('end', () => reject(new Error('stdin closed before the test said go')))
  })
}

const cases = {
  async rollback () {
    const c = await connect()
    try {
      await c.query('BEGIN')
      for (let i = 0; i < 3; i++) await c.query(SPEC.insert, [tag, 'rolled back'])
      const inside = (await first(c, SPEC.count, [tag])).n
      const pid = (await first(c, 'select pg_backend_pid() as pid')).pid
      await c.query('ROLLBACK')
      await c.query(SPEC.insert, [tag, 'kept'])
      return { inside, pids: [pid] }
    } finally {
      await c.end()
    }
  },

  async hold () {
    const c = await connect()
    await c.query('BEGIN')
    for (let i = 0; i < 3; i++) await c.query(SPEC.insert, [tag, 'uncommitted'])
    const inside = (await first(c, SPEC.count, [tag])).n
    const pid = (await first(c, 'select pg_backend_pid() as pid')).pid
    console.log(JSON.stringify({ pid, inside }))
    await new Promise(resolve => setTimeout(resolve, 60000)) // killed long before
    process.exit(3)
  },

  async leak () {
    let a = await connect()
    const out = { later: [] }
    try {
      out.a_first = await probe(a)
      out.a_steps = {}
      for (const [name, sql] of SPEC.a_steps) out.a_steps[name] = await step(a, sql)
      out.a_next = await probe(a)
      for (let first = 0; first < SPEC.later; first += SPEC.group) {
        if (first === SPEC.while_connected) { await a.end(); a = null }
        out.later.push(...await laterGroup(Math.min(SPEC.group, SPEC.later - first)))
      }
    } finally {
      if (a) await a.end()
    }
    return out
  },

  // A sets its state, checks it in its next transaction, prints one line and waits for one on
  // stdin (the test takes every origin connection away meanwhile), then checks it once more.
  async carry () {
    const a = await connect()
    try {
      const out = { a_first: await probe(a), a_steps: {} }
      for (const [name, sql] of SPEC.a_steps) out.a_steps[name] = await step(a, sql)
      out.a_next = await probe(a)
      console.log(JSON.stringify({ paused: true }))
      await nextLine()
      out.a_moved = await probe(a)
      return out
    } finally {
      await a.end()
    }
  },

  async params () {
    const c = await connect()
    try {
      const fresh = { show: await showAll(c), view: view(c) }
      const steps = {}
      for (const [name, sql] of SPEC.param_steps) steps[name] = await step(c, sql)
      const after = { show: await showAll(c), view: view(c) }
      let roundtrip
      try {
        const row = await first(c, SPEC.roundtrip[0], [SPEC.roundtrip[1]])
        roundtrip = [row.t, row.n]
      } catch (e) { roundtrip = error(e) }
      return { fresh, steps, after, roundtrip }
    } finally {
      await c.end()
    }
  }
}

const run = cases[caseName]
if (!run) {
  console.error(`unknown case ${caseName}; one of ${Object.keys(cases).join(', ')}`)
  process.exit(2)
}
const timer = setTimeout(() => { console.error(`${caseName}: still running after 60 s`); process.exit(4) }, 60000)
try {
  console.log(JSON.stringify(await run()))
  clearTimeout(timer)
} catch (e) {
  console.error(`${caseName} failed: ${e.code ? `[${e.code}] ` : ''}${e.stack || e}`)
  process.exit(1)
}
